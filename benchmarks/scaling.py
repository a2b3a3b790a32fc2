"""How cost grows with work: lightfn's compiled step against a fused-Adam PyTorch eager loop.

    python benchmarks/scaling.py              # table + results/scaling.json
    python benchmarks/scaling.py --quick      # smoke test (two small configurations)

Configurations: the seed autoencoder (784-64-3-64-784) at batch sizes 16..4096, a ~7.4M
parameter MLP autoencoder (784-2048-2048-784) and the MNIST CNN (conv 32, conv 64, max
pool, fc 128, fc 10, cross-entropy; the example's dropout left out so both sides do the
same arithmetic). Each side runs the step alone over a few device-resident batches:

- ``lightfn``: ``lf.jit(lf.train_step(loss_fn, lf.optim.adam(1e-3)), donate=True)``, one
  compiled step per model reused for every batch size (the batch dimension is dynamic);
- ``torch``: ``zero_grad / backward / torch.optim.Adam(fused=True).step``.

Memory, measured in a second process (see ``_common.peak_step_bytes``): "extra" is the
peak resident memory of one step above what was resident before it (the OS high-water mark
on CPU, the allocator's peak on CUDA); "peak" adds the state the step starts with (params
and Adam moments; for the eager loop also the ``.grad`` tensors it keeps between steps).
Donation should keep lightfn's extra memory to about the size of the gradients.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LR = 1e-3
SEED_DIMS = (784, 64, 3, 64, 784)
MLP_DIMS = (784, 2048, 2048, 784)
TARGET_MLP_SPEEDUP, TARGET_MLP_MEMORY = 1.3, 1.10


def _mlp(dims):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(zip(dims, dims[1:])):
        layers += [nn.Linear(i, o)] + ([nn.ReLU()] if k < len(dims) - 2 and o != 3 else [])
    return nn.Sequential(*layers)


def _cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def _loss(kind: str):
    import torch.nn.functional as F

    if kind == "mse":  # autoencoders: reconstruct the input
        return lambda out, x, y: F.mse_loss(out, x)
    return lambda out, x, y: F.cross_entropy(out, y)


MODELS = {
    "seed_ae": (lambda: _mlp(SEED_DIMS), "mse", lambda b: C.mlp_train_flops(SEED_DIMS, b)),
    "mlp_7m": (lambda: _mlp(MLP_DIMS), "mse", lambda b: C.mlp_train_flops(MLP_DIMS, b)),
    "mnist_cnn": (_cnn, "ce", None),
}


def _batches(x, y, batch: int, device: str):
    import torch

    n = max(1, min(8, len(x) // batch))
    xs = [torch.from_numpy(x[i * batch : (i + 1) * batch]).to(device) for i in range(n)]
    ys = [torch.from_numpy(y[i * batch : (i + 1) * batch]).to(device) for i in range(n)]
    return list(zip(xs, ys))


class LightfnSide:
    """One compiled step per model, reused across batch sizes; a fresh state per run."""

    def __init__(self, model_name: str, device: str) -> None:
        import lightfn as lf

        build, kind, _ = MODELS[model_name]
        self.module = build().to(device)
        apply, _ = lf.functionalize(self.module)
        loss = _loss(kind)
        self.opt = lf.optim.adam(LR)
        self.step = lf.jit(lf.train_step(lambda p, b: loss(apply(p, b[0]), b[0], b[1]), self.opt), donate=True)

    def runner(self, batches):
        import lightfn as lf

        _, params = lf.functionalize(self.module)
        holder = {"state": lf.TrainState.create(params=lf.tree.map(lambda t: t.clone(), params), optimizer=self.opt, seed=0)}
        it = iter(range(1 << 62))

        def run() -> None:
            holder["state"], _ = self.step(holder["state"], batches[next(it) % len(batches)])

        run.state_bytes = lambda: _bytes(lf.tree.leaves(holder["state"]))  # type: ignore[attr-defined]
        return run


def _bytes(tensors) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def torch_runner(model_name: str, batches, device: str):
    import torch

    build, kind, _ = MODELS[model_name]
    model = build().to(device)
    loss = _loss(kind)
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    it = iter(range(1 << 62))

    def run() -> None:
        x, y = batches[next(it) % len(batches)]
        out = loss(model(x), x, y)
        opt.zero_grad()
        out.backward()
        opt.step()

    # what a step starts with: params, their .grad from the last step, Adam's moments and steps
    run.state_bytes = lambda: _bytes([*model.parameters(), *(p.grad for p in model.parameters()),  # type: ignore[attr-defined]
                                      *(t for st in opt.state.values() for t in st.values())])
    return run


def measure_memory(todo, x, y, device: str) -> dict[str, dict[str, float]]:
    """Peak extra MiB of one step per configuration and side (run in a MALLOC_ENV process)."""
    sides: dict[str, LightfnSide] = {}
    out = {}
    for model_name, batch in todo:
        batches = _batches(x, y, batch, device)
        side = sides.setdefault(model_name, LightfnSide(model_name, device))
        row = {}
        for name, run in (("lightfn", side.runner(batches)), ("torch", torch_runner(model_name, batches, device))):
            extra = C.peak_step_bytes(run, device)
            row[f"{name}_extra_mb"] = extra / 2**20
            row[f"{name}_peak_mb"] = (extra + run.state_bytes()) / 2**20
        out[f"{model_name}:{batch}"] = row
    return out


def configs(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("seed_ae", 16), ("seed_ae", 256)]
    return [("seed_ae", b) for b in (16, 64, 256, 1024, 4096)] + [("mlp_7m", 64), ("mlp_7m", 256), ("mnist_cnn", 64), ("mnist_cnn", 256)]


def main(argv: list[str] | None = None) -> int:
    import torch

    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default=None, help="comma-separated model:batch pairs, e.g. seed_ae:64,mlp_7m:256")
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = C.apply_quick(p.parse_args(argv))
    args.device = C.resolve_device(args.device)
    x, y, source = C.load_images(args.data_dir)
    todo = [(m, int(b)) for m, b in (c.split(":") for c in args.configs.split(","))] if args.configs else configs(args.quick)
    if args.memory_only:
        print(json.dumps(measure_memory(todo, x, y, args.device)))
        return 0
    info = C.machine_info()
    rate = C.sgemm_flops_per_s()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    print(f"data: {source}; device {args.device}; sgemm {rate / 1e9:.1f} GFLOP/s")

    sides: dict[str, LightfnSide] = {}
    rows: list[dict[str, Any]] = []
    for model_name, batch in todo:
        batches = _batches(x, y, batch, args.device)
        if model_name not in sides:
            sides[model_name] = LightfnSide(model_name, args.device)
        n_params = sum(p.numel() for p in sides[model_name].module.parameters())
        # Fewer steps per window for big steps: about the same work per window as the seed at batch 64.
        flops_fn = MODELS[model_name][2]
        work = (flops_fn(batch) if flops_fn else 6 * n_params * batch * 8) / C.mlp_train_flops(SEED_DIMS, 64)
        window = max(2, min(args.steps, int(args.steps / max(work, 1e-9))))
        row: dict[str, Any] = {"model": model_name, "batch": batch, "params_m": n_params / 1e6,
                               "grads_mb": n_params * 4 / 2**20, "steps_per_window": window}
        for side, make in (("lightfn", lambda: sides[model_name].runner(batches)),
                           ("torch", lambda: torch_runner(model_name, batches, args.device))):
            run = make()
            clock = C.StepClock(warmup=max(2, min(args.warmup, window)), window=window, repeats=args.repeats, sync=sync)
            C.time_loop(run, clock)
            row[f"{side}_us"] = clock.median_us()
            row[f"{side}_cpu_us"] = clock.median_cpu_us()
        row["speedup"] = row["torch_us"] / row["lightfn_us"]
        row["lightfn_samples_per_s"] = batch / row["lightfn_us"] * 1e6
        if flops_fn:
            row["lightfn_x_floor"] = row["lightfn_us"] / (flops_fn(batch) / rate * 1e6)
        rows.append(row)
        print(f"{model_name} batch {batch}: lightfn {row['lightfn_us']:.0f} us, torch {row['torch_us']:.0f} us "
              f"({row['speedup']:.2f}x)", flush=True)

    # Memory in a second process whose allocator returns every large block at once (see _common).
    argv = ["--memory-only", "--configs", ",".join(f"{m}:{b}" for m, b in todo), "--data-dir", str(args.data_dir),
            "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    memory = C.run_probe(pathlib.Path(__file__), argv, env=C.MALLOC_ENV)
    for row in rows:
        row.update(memory[f"{row['model']}:{row['batch']}"])
        row["memory_ratio"] = row["lightfn_peak_mb"] / row["torch_peak_mb"]

    table = C.format_table(rows, [
        ("model", "model", ""), ("batch", "batch", ""), ("params_m", "params (M)", "{:.2f}"),
        ("lightfn_us", "lightfn us/step", "{:.0f}"), ("torch_us", "torch fused us/step", "{:.0f}"),
        ("speedup", "lightfn speedup", "{:.2f}x"), ("lightfn_cpu_us", "lightfn CPU us", "{:.0f}"),
        ("torch_cpu_us", "torch CPU us", "{:.0f}"), ("lightfn_samples_per_s", "lightfn samples/s", "{:.0f}"),
        ("lightfn_x_floor", "lightfn x floor", "{:.2f}"), ("grads_mb", "grads MiB", "{:.1f}"),
        ("lightfn_extra_mb", "lightfn extra MiB", "{:.1f}"), ("torch_extra_mb", "torch extra MiB", "{:.1f}"),
        ("lightfn_peak_mb", "lightfn peak MiB", "{:.1f}"), ("torch_peak_mb", "torch peak MiB", "{:.1f}"),
        ("memory_ratio", "memory ratio", "{:.2f}"),
    ])
    print(f"\nscaling, {args.device}: lightfn compiled donated step vs torch fused-Adam eager loop")
    print(table)
    targets = {}
    mlp = [r for r in rows if r["model"] == "mlp_7m"]
    if mlp:
        targets = {"mlp_speedup_min": min(r["speedup"] for r in mlp), "mlp_speedup_target": TARGET_MLP_SPEEDUP,
                   "mlp_memory_ratio_max": max(r["memory_ratio"] or 0 for r in mlp), "mlp_memory_ratio_target": TARGET_MLP_MEMORY}
        print(f"larger MLP: speedup >= {targets['mlp_speedup_min']:.2f}x (target {TARGET_MLP_SPEEDUP}x), extra memory "
              f"<= {targets['mlp_memory_ratio_max']:.2f}x the eager loop's (target <= {TARGET_MLP_MEMORY:.2f}x)")
    payload = {"benchmark": "scaling", "machine": info, "data": source, "device": args.device, "sgemm_flops_per_s": rate,
               "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
               "rows": rows, "targets": targets, "table": table}
    print(f"wrote {C.write_json('scaling', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
