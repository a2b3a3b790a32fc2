"""The compiled ``lf.train_step`` against a ``torch.optim.Adam`` eager loop (seed autoencoder, batch 64).

    python benchmarks/step_vs_eager.py            # table + results/step_vs_eager.json
    python benchmarks/step_vs_eager.py --quick    # smoke test

The step alone, without a training loop around it: every variant runs over the same few
pre-sliced batches, resident on the device, so only the step's own cost is timed.

- ``lightfn_jit``: ``lf.jit(lf.train_step(loss_fn, lf.optim.adam(1e-3)), donate=True)``;
- ``lightfn_eager``: the same step uncompiled;
- ``torch_adam``: ``zero_grad / backward / torch.optim.Adam.step`` (default, foreach);
- ``torch_adam_fused``: the same with ``fused=True``.

Targets: lightfn_jit >= 2x the torch_adam eager loop on this CPU (issue 2); lightfn_eager
within 1.3x of it (issue 15: plain eager, the step takes gradients with torch.autograd and
updates with ``_foreach`` ops, see lightfn/_eager.py). ``--variants lightfn_eager,torch_adam``
measures the eager pair alone.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DIMS = (784, 64, 3, 64, 784)
LR, BATCH, N_BATCHES = 1e-3, 64, 16
TARGET = 2.0
EAGER_TARGET = 1.3


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(zip(DIMS, DIMS[1:])):
        layers.append(nn.Linear(i, o))
        if k in (0, 2):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lightfn_variant(batches, device: str, *, compiled: bool):
    import torch.nn.functional as F

    import lightfn as lf

    apply, params = lf.functionalize(_model().to(device))

    def loss_fn(params, batch):
        return F.mse_loss(apply(params, batch), batch)

    opt = lf.optim.adam(LR)
    holder = {"state": lf.TrainState.create(params=params, optimizer=opt, seed=0)}
    step = lf.train_step(loss_fn, opt)
    if compiled:
        step = lf.jit(step, donate=True)
    it = iter(range(1 << 62))

    def run() -> None:
        holder["state"], _ = step(holder["state"], batches[next(it) % len(batches)])

    return run


def torch_variant(batches, device: str, *, fused: bool):
    import torch
    import torch.nn.functional as F

    model = _model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=fused or None)
    it = iter(range(1 << 62))

    def run() -> None:
        xb = batches[next(it) % len(batches)]
        loss = F.mse_loss(model(xb), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return run


VARIANTS = {
    "lightfn_jit": lambda b, d: lightfn_variant(b, d, compiled=True),
    "lightfn_eager": lambda b, d: lightfn_variant(b, d, compiled=False),
    "torch_adam": lambda b, d: torch_variant(b, d, fused=False),
    "torch_adam_fused": lambda b, d: torch_variant(b, d, fused=True),
}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = C.apply_quick(p.parse_args(argv))
    args.device = C.resolve_device(args.device)
    x, _, source = C.load_images(args.data_dir)
    batches = [torch.from_numpy(x[i * BATCH : (i + 1) * BATCH]).to(args.device) for i in range(N_BATCHES)]
    info = C.machine_info()
    rate = C.sgemm_flops_per_s()
    floor_us = C.mlp_train_flops(DIMS, BATCH) / rate * 1e6
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None

    rows: list[dict[str, Any]] = []
    for name in args.variants.split(","):
        clock = C.StepClock(warmup=args.warmup, window=args.steps, repeats=args.repeats, sync=sync)
        C.time_loop(VARIANTS[name](batches, args.device), clock)
        us = clock.median_us()
        rows.append({"variant": name, "us_per_step": us, "samples_per_s": BATCH / us * 1e6, "cpu_us_per_step": clock.median_cpu_us(), "x_floor": us / floor_us,
                     "windows_us": [w * 1e6 for w in clock.per_step_s()]})
        print(f"{name}: {us:.0f} us/step", flush=True)
    by = {r["variant"]: r for r in rows}
    jit_us = by["lightfn_jit"]["us_per_step"] if "lightfn_jit" in by else None
    for r in rows:
        r["lightfn_jit_speedup"] = None if jit_us is None else r["us_per_step"] / jit_us
    table = C.format_table(rows, [("variant", "variant", ""), ("us_per_step", "us/step", "{:.0f}"), ("cpu_us_per_step", "CPU us/step", "{:.0f}"),
                                  ("samples_per_s", "samples/s", "{:.0f}"), ("x_floor", "x FLOP floor", "{:.2f}"),
                                  ("lightfn_jit_speedup", "lightfn_jit speedup", "{:.2f}x")])
    ratio = by["torch_adam"]["us_per_step"] / jit_us if jit_us and "torch_adam" in by else None
    print(f"\nseed autoencoder step, batch {BATCH}, {args.device} (FLOP floor {floor_us:.0f} us/step)")
    print(table)
    if ratio is not None:
        print(f"compiled lf.train_step vs torch.optim.Adam eager loop: {ratio:.2f}x (target >= {TARGET:.0f}x: "
              f"{'met' if ratio >= TARGET else 'MISSED'})")
    eager = by["lightfn_eager"]["us_per_step"] / by["torch_adam"]["us_per_step"] if {"lightfn_eager", "torch_adam"} <= set(by) else None
    eager_cpu = by["lightfn_eager"]["cpu_us_per_step"] / by["torch_adam"]["cpu_us_per_step"] if eager is not None else None
    if eager is not None:
        print(f"lf.train_step eager vs torch.optim.Adam eager loop: {eager:.2f}x wall, {eager_cpu:.2f}x CPU time "
              f"(target <= {EAGER_TARGET}x: {'met' if eager <= EAGER_TARGET else 'MISSED'})")
    payload = {"benchmark": "step_vs_eager", "machine": info, "data": source, "device": args.device, "batch_size": BATCH,
               "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
               "sgemm_flops_per_s": rate, "flop_floor_us": floor_us, "variants": rows,
               "speedup_vs_torch_adam": ratio, "target": TARGET, "eager_vs_torch_adam": eager,
               "eager_cpu_vs_torch_adam": eager_cpu, "eager_target": EAGER_TARGET, "table": table}
    print(f"wrote {C.write_json('step_vs_eager', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
