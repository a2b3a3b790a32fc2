"""Per-step time of ``lf.distributed.data_parallel`` (compiled) vs torch DDP, on 2 processes.

    python benchmarks/ddp_overhead.py                        # full run: table + results/ddp_overhead.json
    python benchmarks/ddp_overhead.py --steps 5 --repeats 1 --warmup 2 --models autoencoder   # smoke test

The script launches itself under ``torchrun --nproc_per_node=N`` (gloo on 127.0.0.1 on CPU,
NCCL when CUDA is available) unless it already runs under torchrun. Each rank trains the
same model from the same initial weights on its half of the same global batches:

- ``lightfn``: ``lf.jit(lf.distributed.data_parallel(lf.train_step(loss_fn, adam), mesh),
  donate=True)``: forward, backward, one flat-bucket gradient all-reduce and the Adam
  update in one compiled graph (what ``lf.fit(strategy="ddp")`` runs);
- ``torch_ddp``: ``torch.nn.parallel.DistributedDataParallel`` + ``torch.optim.Adam`` in
  the usual eager loop (zero_grad, forward, backward, step).

Models: the seed autoencoder 784-64-3-64-784 (MSE) and a ~1.07M-param MLP
784-1024-256-10 (cross-entropy). Timing: ``--warmup`` untimed steps (compilation happens
there), then ``--repeats`` windows of ``--steps`` steps between barriers; a window's time is
the slowest rank's; the reported time per step is the median over windows. The report also
gives the largest parameter difference between the two systems (they
compute the same thing) after the warm-up steps: ~1e-6 or less. (Over hundreds of steps the
MLP on random labels drifts apart in float32: Adam divides near-zero gradients by their
near-zero RMS, which turns rounding differences into full-size steps.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = {
    # name: (layer sizes, loss, global batch, learning rate)
    "autoencoder": ((784, 64, 3, 64, 784), "mse", 128, 1e-3),
    "mlp_1m": ((784, 1024, 256, 10), "ce", 256, 1e-3),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation included)")
    p.add_argument("--steps", type=int, default=100, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=7, help="timed windows; the median is reported")
    p.add_argument("--eager", action="store_true", help="run lightfn's step uncompiled (smoke tests only: no compile time)")
    p.add_argument("--nproc", type=int, default=2, help="processes (torchrun --nproc_per_node)")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "ddp_overhead.json")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(pathlib.Path(__file__).resolve()), *argv,
    ]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        return proc.returncode
    print_table(json.loads(args.out.read_text()))
    return 0


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['world_size']} x {report['device']} ({report['backend']}), torch {report['torch']}, "
          f"lightfn {'compiled' if report['compiled'] else 'EAGER'}, "
          f"median of {report['repeats']} x {report['steps']} steps, {report['warmup']} warm-up steps excluded")
    head = f"{'model':<12} {'params':>9} {'batch':>6} {'lightfn ms':>11} {'torch DDP ms':>13} {'DDP/lightfn':>12} {'max |dp|':>9}"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        print(f"{r['model']:<12} {r['params']:>9,} {r['global_batch']:>6} {r['lightfn_ms']:>11.3f} "
              f"{r['torch_ddp_ms']:>13.3f} {r['speedup']:>11.2f}x {r['max_param_diff']:>9.1e}")


# ----------------------------------------------------------------------------- worker


def _module(sizes: tuple[int, ...]) -> Any:
    import torch

    layers: list[Any] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _batches(sizes: tuple[int, ...], loss: str, global_batch: int, count: int, rank: int, world: int, device: Any) -> list[Any]:
    """``count`` distinct global batches (the same on every rank); this rank's rows of each."""
    import torch

    g = torch.Generator().manual_seed(1234)
    per = global_batch // world
    out = []
    for _ in range(count):
        x = torch.rand(global_batch, sizes[0], generator=g)
        y = x if loss == "mse" else torch.randint(0, sizes[-1], (global_batch,), generator=g)
        out.append((x[rank * per : (rank + 1) * per].to(device), y[rank * per : (rank + 1) * per].to(device)))
    return out


def _time(fn: Any, n_warmup: int, steps: int, repeats: int, sync: Any, after_warmup: Any) -> float:
    """Median over windows of the slowest rank's seconds per step (``after_warmup()`` runs
    once between the warm-up and the timed windows)."""
    import torch
    import torch.distributed as dist

    for i in range(n_warmup):
        fn(i)
    sync()
    after_warmup()
    times = []
    for r in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            fn(n_warmup + r * steps + i)
        sync()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(float(dt) / steps)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import lightfn as lf
    import lightfn.distributed as ld
    from lightfn.optim.alias import adam

    mesh = ld.init()
    device = mesh.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for name in args.models.split(","):
        sizes, loss_kind, global_batch, lr = MODELS[name]
        torch.manual_seed(0)
        module = _module(sizes).to(device)
        total = args.warmup + args.steps * args.repeats
        data = _batches(sizes, loss_kind, global_batch, min(total, 16), mesh.rank, mesh.world_size, device)

        def loss_of(out: Any, y: Any) -> Any:
            return F.mse_loss(out, y) if loss_kind == "mse" else F.cross_entropy(out, y)

        # lightfn: the compiled data-parallel pure step
        apply, params = lf.functionalize(module)

        def loss_fn(p: Any, batch: Any) -> Any:
            x, y = batch
            return loss_of(apply(p, x), y)

        opt = adam(lr)
        state = ld.replicate_state(lf.TrainState.create(params={k: v.detach().clone() for k, v in params.items()}, optimizer=opt), mesh)
        step = ld.data_parallel(lf.train_step(loss_fn, opt), mesh)
        step = step if args.eager else lf.jit(step, donate=True)
        holder = {"state": state}

        def lf_step(i: int) -> None:
            holder["state"], _ = step(holder["state"], data[i % len(data)])

        snap: dict[str, Any] = {}
        lf_time = _time(lf_step, args.warmup, args.steps, args.repeats, sync,
                        lambda: snap.update({k: v.detach().clone() for k, v in holder["state"].params.items()}))

        # torch DDP + torch.optim.Adam, from the same initial weights
        torch.manual_seed(0)
        ref = _module(sizes).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(ref, device_ids=[device.index] if device.type == "cuda" else None)
        topt = torch.optim.Adam(ddp.parameters(), lr=lr)

        def torch_step(i: int) -> None:
            x, y = data[i % len(data)]
            topt.zero_grad(set_to_none=True)
            loss_of(ddp(x), y).backward()
            topt.step()

        diffs: list[float] = []
        torch_time = _time(torch_step, args.warmup, args.steps, args.repeats, sync,
                           lambda: diffs.extend(float((snap[k] - v.detach()).abs().max()) for k, v in ref.named_parameters()))
        diff = max(diffs)
        results.append({
            "model": name, "params": sum(v.numel() for v in params.values()), "global_batch": global_batch,
            "lightfn_ms": lf_time * 1e3, "torch_ddp_ms": torch_time * 1e3, "speedup": torch_time / lf_time,
            "max_param_diff": diff,
        })
    if mesh.is_main:
        report = {
            "benchmark": "ddp_overhead", "world_size": mesh.world_size, "device": device.type,
            "backend": mesh.backend, "torch": torch.__version__, "warmup": args.warmup, "steps": args.steps,
            "repeats": args.repeats, "compiled": not args.eager, "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODELS)}")
    args.out = args.out.resolve()
    if "RANK" in os.environ:
        worker(args)
        return 0
    return launch(args, [*argv, "--out", str(args.out)] if "--out" not in argv else argv)


if __name__ == "__main__":
    sys.exit(main())
