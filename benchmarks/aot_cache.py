"""Seconds to the first step of a later process, with and without lightfn's AOT cache.

    python benchmarks/aot_cache.py               # tables + results/aot_cache.json
    python benchmarks/aot_cache.py --quick       # smoke test

The seed autoencoder (784-64-3-64-784, Adam 1e-3, batch 64) starts training in fresh
processes, with ``LIGHTFN_AOT=1`` (the compiled step is an AOTInductor package in lightfn's
cache, loaded without tracing) and without (``torch.compile``: dynamo re-traces in every
process, kernels come from the inductor cache). Two entry points: ``lf.fit`` (its fused
train-and-accumulate graph) and a bare ``lf.jit(step, donate=True)``. Per mode the first
process fills empty caches ("1st process"); the next ``--starts`` find them warm ("later
process", median). Figures are seconds from launching the process to the end of its first
train step, and the part of it after ``import torch`` finished. Steady state: both ways in
one process, timed windows interleaved, median wall and CPU us/step, params compared bit
for bit at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from seed_autoencoder import BATCH, DIMS, lightfn_problem  # noqa: E402 (the seed model seed_autoencoder.py times)


def _problem(args):
    return lightfn_problem()


def probe_fit(args) -> dict:
    """One fresh process: ``lf.fit`` on the seed model; when did its first step end?"""
    import torch

    torch_done = time.time()
    import lightfn as lf
    from lightfn._compile import aot as _aot

    x, _, _ = C.load_images(args.data_dir)
    step, state = _problem(args)
    loader = lf.data.ArrayLoader((torch.from_numpy(x),), batch_size=BATCH)
    first: list[float] = []

    class First(lf.callbacks.Callback):
        def on_train_batch_end(self, ctx):
            first.append(time.time())
            return lf.callbacks.Signal(stop=True, reason="timed")

    lf.fit(step, state, loader, max_epochs=1, callbacks=[First()], progress=False)
    return {"first_step_at": first[0], "torch_imported_at": torch_done, "stats": _aot.stats()}


def probe_step(args) -> dict:
    """One fresh process: the seed model's ``lf.jit(step, donate=True)`` on one batch."""
    import torch

    torch_done = time.time()
    import lightfn as lf
    from lightfn._compile import aot as _aot

    step, state = _problem(args)
    batch = (torch.rand(BATCH, DIMS[0]),)
    lf.jit(step, donate=True)(state, batch)
    return {"first_step_at": time.time(), "torch_imported_at": torch_done, "stats": _aot.stats()}


def probe_steady(args) -> dict:
    """Both ways in one process, windows interleaved (neighbours slow both alike)."""
    import torch

    import lightfn as lf

    step, state = _problem(args)
    batch = (torch.rand(BATCH, DIMS[0]),)
    runs = {}
    for name, cache in (("jit", False), ("aot", True)):
        runs[name] = [lf.jit(step, donate=True, cache=cache), lf.tree.map(torch.clone, state)]
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(1 + args.repeats):
        for name, run in runs.items():
            f, s = run
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.warmup if rep == 0 else args.steps):
                s, _ = f(s, batch)
            if rep:
                wall[name].append((time.perf_counter() - t) / args.steps * 1e6)
                cpu[name].append((time.process_time() - c) / args.steps * 1e6)
            run[1] = s
    same = all(torch.equal(a, b) for a, b in zip(lf.tree.leaves(runs["jit"][1]), lf.tree.leaves(runs["aot"][1])))
    return {"us": {k: statistics.median(v) for k, v in wall.items()},
            "cpu_us": {k: statistics.median(v) for k, v in cpu.items()}, "bitwise_equal": same}


PROBES = {"fit": probe_fit, "step": probe_step, "steady": probe_steady}


def _run(kind: str, args, env: dict[str, str]) -> dict:
    argv = ["--probe", kind, "--data-dir", str(args.data_dir), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--repeats", str(args.repeats)]
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe {kind} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    r = json.loads(lines[-1])
    if "first_step_at" in r:
        r["first_step_s"] = r["first_step_at"] - launched
        r["after_torch_s"] = r["first_step_at"] - r["torch_imported_at"]
    return r


def run_mode(kind: str, aot: bool, starts: int, args, env: dict[str, str]) -> dict:
    env = {**env, "LIGHTFN_AOT": "1" if aot else "0"}
    runs = [_run(kind, args, env) for _ in range(1 + starts)]
    cold, warm = runs[0], runs[1:]
    return {
        "what": "lf.fit, 1st step" if kind == "fit" else "lf.jit step, 1st call",
        "mode": "AOT cache (LIGHTFN_AOT=1)" if aot else "torch.compile (today)",
        "cold_first_step_s": cold["first_step_s"],
        "warm_first_step_s": statistics.median(r["first_step_s"] for r in warm),
        "warm_after_torch_s": statistics.median(r["after_torch_s"] for r in warm),
        "warm_stats": warm[-1]["stats"],
        "runs": runs,
    }


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--probe", choices=sorted(PROBES), help=argparse_hidden())
    p.add_argument("--starts", type=int, default=2, help="warm processes per mode (default 2)")
    args = p.parse_args()
    if args.probe:
        print(json.dumps(PROBES[args.probe](args)))
        return
    args = C.apply_quick(args)
    if args.quick:
        args.starts = 1
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "LIGHTFN_CACHE_DIR": f"{tmp}/lightfn"}
        # The inductor cache is shared: the torch.compile rows run first, so the AOT rows'
        # "cold" has kernels of the same graph in it (the AOT build itself is still cold).
        rows = [run_mode(kind, aot, args.starts, args, env) for kind in ("fit", "step") for aot in (False, True)]
        steady = _run("steady", args, env)
    print(C.format_table(rows, [
        ("what", "what", ""),
        ("mode", "mode", ""),
        ("cold_first_step_s", "1st process: start -> 1st step (s)", "{:.1f}"),
        ("warm_first_step_s", "later process: start -> 1st step (s)", "{:.2f}"),
        ("warm_after_torch_s", "of which after import torch (s)", "{:.2f}"),
    ]))
    print(f"steady state, lf.jit(step, donate=True), seed model, interleaved windows: "
          f"torch.compile {steady['us']['jit']:.0f} us/step ({steady['cpu_us']['jit']:.0f} CPU us), "
          f"AOT cache {steady['us']['aot']:.0f} us/step ({steady['cpu_us']['aot']:.0f} CPU us); "
          f"params bitwise equal: {steady['bitwise_equal']}")
    path = C.write_json("aot_cache", {"machine": C.machine_info(), "rows": rows, "steady": steady}, args.out)
    print(f"wrote {path}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
