"""One compiled ``lf.ensemble`` step over 8 MLPs against 8 compiled single steps run one after another.

    python benchmarks/ensemble.py --threads 1   # table + results/ensemble.json
    python benchmarks/ensemble.py --threads 1 --batch-size 16   # results/ensemble_b16.json
    python benchmarks/ensemble.py --quick       # smoke test

8 members, each an MLP 784-128-10 (ReLU, cross-entropy, Adam 1e-3), all trained on the
same batch of 64 MNIST images per step (a seed ensemble, or an lr sweep: the work is the
same). A "step" here is one update of ALL 8 members:

- ``ensemble_jit``: ``lf.jit(lf.ensemble(lf.train_step(...)), donate=True)`` on the 8
  states stacked with ``lf.tree.stack``: one call, one graph (the members' matmuls batched);
- ``separate_jit``: ``lf.jit(lf.train_step(...), donate=True)`` called 8 times, once per
  member's state (one compiled graph reused: the states have equal shapes), which is what
  a loop over K training runs in one process costs.

Both run over the same few pre-sliced batches, resident on the device, so only the steps'
own cost is timed. Target: ensemble_jit >= 2x faster than separate_jit on this CPU.

GEMM share (``--gemm``, on by default on CPU): the CPU time of each variant's matmuls alone,
run eagerly with the shapes and layouts of the compiled graphs (the ensemble's ``bmm`` with
the shared batch broadcast, stride 0; the single step's ``mm``), and the same GEMMs written
as one ``mm`` over the members' concatenated weights (the rewrite a shared batch allows).
``separate CPU / ensemble GEMM CPU`` bounds the ensemble's speedup: it is what the ensemble
would reach if everything but its matmuls cost nothing.

``--hidden 16`` swaps the 128-wide hidden layer for a 16-wide one: a second, smaller
model (a separate row in RESULTS.md, not the target's model) where per-call overhead
rather than matmuls dominates a single step.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DIMS = (784, 128, 10)
MEMBERS, LR, BATCH, N_BATCHES = 8, 1e-3, 64, 16
TARGET = 2.0


def _members(device: str, dims=DIMS):
    """``(apply, [params of member i])``: 8 MLPs with different initial weights."""
    import torch
    from torch import nn

    import lightfn as lf

    params = []
    for i in range(MEMBERS):
        torch.manual_seed(i)
        apply, p = lf.functionalize(nn.Sequential(nn.Linear(dims[0], dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2])).to(device))
        params.append(p)
    return apply, params


def _step(apply):
    import torch.nn.functional as F

    import lightfn as lf

    def loss_fn(params, batch):
        x, y = batch
        return F.cross_entropy(apply(params, x), y)

    opt = lf.optim.adam(LR)
    return opt, lf.train_step(loss_fn, opt)


def ensemble_variant(batches, device: str, dims=DIMS):
    import lightfn as lf

    apply, params = _members(device, dims)
    opt, step = _step(apply)
    holder = {"state": lf.tree.stack([lf.TrainState.create(params=p, optimizer=opt, seed=i) for i, p in enumerate(params)])}
    step = lf.jit(lf.ensemble(step), donate=True)
    it = iter(range(1 << 62))

    def run() -> None:
        holder["state"], _ = step(holder["state"], batches[next(it) % len(batches)])

    return run


def separate_variant(batches, device: str, dims=DIMS):
    import lightfn as lf

    apply, params = _members(device, dims)
    opt, step = _step(apply)
    states = [lf.TrainState.create(params=p, optimizer=opt, seed=i) for i, p in enumerate(params)]
    step = lf.jit(step, donate=True)
    it = iter(range(1 << 62))

    def run() -> None:
        batch = batches[next(it) % len(batches)]
        for i in range(MEMBERS):
            states[i], _ = step(states[i], batch)

    return run


VARIANTS = {"ensemble_jit": ensemble_variant, "separate_jit": separate_variant}


def gemm_cpu_us(dims, batch: int, members: int = MEMBERS, reps: int = 40, trials: int = 7) -> dict[str, float]:
    """CPU us per step of the GEMMs alone (see module docs), median of ``trials``.

    Per layer ``i -> o``: the forward product, the weight gradient and, except for the
    first layer (its input is data), the input gradient; weights stored ``[o, i]`` as
    nn.Linear keeps them, so the products read them transposed as the graphs do.
    """
    import statistics
    import time

    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dims[0], generator=g)
    layers = []
    for k, (i, o) in enumerate(zip(dims, dims[1:])):
        inp = x.expand(members, batch, i) if k == 0 else torch.randn(members, batch, i, generator=g)
        layers.append((k, inp, torch.randn(members, o, i, generator=g), torch.randn(members, batch, o, generator=g)))

    def ensemble() -> None:
        for k, a, w, grad in layers:
            torch.bmm(a, w.transpose(1, 2))
            torch.bmm(grad.transpose(1, 2), a)
            if k:
                torch.bmm(grad, w)

    def separate() -> None:
        for m in range(members):
            for k, a, w, grad in layers:
                a_m, w_m, g_m = a[m], w[m], grad[m]
                torch.mm(a_m, w_m.t())
                torch.mm(g_m.t(), a_m)
                if k:
                    torch.mm(g_m, w_m)

    def concatenated() -> None:
        # the shared-batch first layer as one mm over the K members' weights [K*o, i]
        for k, a, w, grad in layers:
            if k == 0:
                torch.mm(x, w.reshape(-1, w.shape[-1]).t())
                torch.mm(grad.transpose(1, 2).reshape(-1, batch), x)
            else:
                torch.bmm(a, w.transpose(1, 2))
                torch.bmm(grad.transpose(1, 2), a)
                torch.bmm(grad, w)

    out: dict[str, list[float]] = {"ensemble_bmm": [], "separate_mm": [], "ensemble_concat_mm": []}
    fns = {"ensemble_bmm": ensemble, "separate_mm": separate, "ensemble_concat_mm": concatenated}
    for fn in fns.values():
        for _ in range(5):
            fn()
    for _ in range(trials):  # interleaved, so load changes hit all three alike
        for name, fn in fns.items():
            start = time.process_time()
            for _ in range(reps):
                fn()
            out[name].append((time.process_time() - start) / reps * 1e6)
    return {name: statistics.median(v) for name, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=BATCH, help=f"rows per step, shared by the members (default {BATCH})")
    p.add_argument("--hidden", type=int, default=DIMS[1], help=f"hidden width (default {DIMS[1]}; 16: the smaller-MLP row)")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM-share measurement")
    args = C.apply_quick(p.parse_args(argv))
    batch = args.batch_size
    dims = (DIMS[0], args.hidden, DIMS[2])
    args.device = C.resolve_device(args.device)
    x, y, source = C.load_images(args.data_dir)
    batches = [(torch.from_numpy(x[i * batch : (i + 1) * batch]).to(args.device),
                torch.from_numpy(y[i * batch : (i + 1) * batch]).to(args.device)) for i in range(N_BATCHES)]
    info = C.machine_info()
    rate = C.sgemm_flops_per_s()
    floor_us = MEMBERS * C.mlp_train_flops(dims, batch) / rate * 1e6
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    load = _loadavg()

    rows: list[dict[str, Any]] = []
    for name in args.variants.split(","):
        clock = C.StepClock(warmup=args.warmup, window=args.steps, repeats=args.repeats, sync=sync)
        C.time_loop(VARIANTS[name](batches, args.device, dims), clock)
        us = clock.median_us()
        rows.append({"variant": name, "us_per_step": us, "cpu_us_per_step": clock.median_cpu_us(),
                     "us_per_member_step": us / MEMBERS, "samples_per_s": MEMBERS * batch / us * 1e6,
                     "x_floor": us / floor_us, "windows_us": [w * 1e6 for w in clock.per_step_s()]})
        print(f"{name}: {us:.0f} us per step of all {MEMBERS} members", flush=True)
    by = {r["variant"]: r for r in rows}
    ens_us = by["ensemble_jit"]["us_per_step"] if "ensemble_jit" in by else None
    for r in rows:
        r["ensemble_speedup"] = None if ens_us is None else r["us_per_step"] / ens_us
    table = C.format_table(rows, [("variant", "variant", ""), ("us_per_step", "us/step (8 members)", "{:.0f}"),
                                  ("cpu_us_per_step", "CPU us/step", "{:.0f}"), ("us_per_member_step", "us/member", "{:.0f}"),
                                  ("samples_per_s", "member-samples/s", "{:.0f}"), ("x_floor", "x FLOP floor", "{:.2f}"),
                                  ("ensemble_speedup", "ensemble speedup", "{:.2f}x")])
    ratio = by["separate_jit"]["us_per_step"] / ens_us if ens_us and "separate_jit" in by else None
    gemm = None if args.no_gemm or args.device != "cpu" else gemm_cpu_us(dims, batch, **({"reps": 2, "trials": 1} if args.quick else {}))
    load_end = _loadavg()
    print(f"\n{MEMBERS} x MLP {'-'.join(map(str, dims))}, Adam, batch {batch}, {args.device} "
          f"(FLOP floor {floor_us:.0f} us/step; load average {load} at start, {load_end} at end)")
    print(table)
    if ratio is not None:
        print(f"compiled lf.ensemble step vs {MEMBERS} compiled single steps: {ratio:.2f}x (target >= {TARGET:.0f}x: "
              f"{'met' if ratio >= TARGET else 'MISSED'})")
        cpu_ratio = by["separate_jit"]["cpu_us_per_step"] / by["ensemble_jit"]["cpu_us_per_step"]
        print(f"CPU time ratio: {cpu_ratio:.2f}x")
    if gemm is not None:
        print("GEMMs alone, CPU us per step of all members: " + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items()))
        if "separate_jit" in by:
            sep = by["separate_jit"]["cpu_us_per_step"]
            print(f"bound on the speedup (separate CPU / ensemble GEMM CPU): {sep / gemm['ensemble_bmm']:.2f}x "
                  f"(GEMMs are {gemm['separate_mm'] / sep:.0%} of a single step's CPU time)")
    payload = {"benchmark": "ensemble", "machine": info, "data": source, "device": args.device, "batch_size": batch,
               "members": MEMBERS, "dims": list(dims), "gemm_cpu_us": gemm, "load_average": {"start": load, "end": load_end},
               "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
               "sgemm_flops_per_s": rate, "flop_floor_us": floor_us, "variants": rows,
               "speedup_vs_separate": ratio, "target": TARGET, "table": table}
    name = "ensemble" + ("" if dims == DIMS else f"_h{dims[1]}") + ("" if batch == BATCH else f"_b{batch}")
    print(f"wrote {C.write_json(name, payload, args.out)}")
    return 0


def _loadavg() -> str:
    try:
        return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
