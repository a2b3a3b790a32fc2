"""Short jobs: does compiling ever make an example end later than ``jit=False``?

    python benchmarks/short_jobs.py                 # every example, 2 epochs each
    python benchmarks/short_jobs.py --quick         # smoke test: the autoencoder, 5 steps

Each example in ``examples/`` runs as a user runs it, in a fresh process timed from just
before it starts to its exit, three ways:

- ``eager``: ``--no-jit``;
- ``cold``: the default (jit on: fit compiles in the background, ``custom_loop`` uses
  ``lf.jit(background=True)``) with empty ``TORCHINDUCTOR_CACHE_DIR`` and
  ``LIGHTFN_CACHE_DIR``: the worst case for compiling. Its background build may outlive
  the process; the script then waits for it (``build_done_s``: when it had finished,
  counted from the process's start) so that it does not slow the next measurement;
- ``warm``: the default again, on the folders the cold run filled.

``transformer_lm`` is eager by default; its jit-on runs pass ``--jit``. ``export`` trains
nothing it could compile and is not timed. ``switched`` says whether the cold run's steps
switched to the compiled graphs before the job ended (the example's output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

EXAMPLES = C.HERE.parent / "examples"
# name -> extra arguments turning its jit on (all but transformer_lm compile by default)
JOBS: dict[str, tuple[str, ...]] = {
    "autoencoder": (), "custom_loop": (), "mnist_classifier": (), "gan": (), "dp_mnist": (), "ensemble": (),
    "maml_sine": (), "transformer_lm": ("--jit",),
}
NO_DATA = ("maml_sine", "transformer_lm")  # they make their own data


def run_job(name: str, mode: str, args: argparse.Namespace, work: pathlib.Path) -> dict[str, Any]:
    cache = work / f"{name}-cache"
    argv = [sys.executable, str(EXAMPLES / f"{name}.py"), "--out", str(work / f"{name}-{mode}"),
            "--max-epochs", str(args.epochs), "--threads", str(args.threads)]
    if name not in NO_DATA:
        argv += ["--data-dir", str(args.data_dir), "--no-download"]
    if args.limit_train_batches is not None:
        argv += ["--limit-train-batches", str(args.limit_train_batches)]
    argv += ["--no-jit"] if mode == "eager" else list(JOBS[name])
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "LIGHTFN_CACHE_DIR": str(cache / "lightfn")}
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=C.HERE.parent)
    exit_s = time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"{name} ({mode}) failed (exit {proc.returncode}):\n" + "\n".join(tail))
    out = proc.stdout
    row = {"exit_s": exit_s, "switched": "compiled (" in out or "runs compiled (loaded" in out}
    if mode != "eager":
        C.wait_for_build(cache / "lightfn")
        row["build_done_s"] = time.time() - t0
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=pathlib.Path, default=C.DEFAULT_DATA_DIR)
    p.add_argument("--examples", default=None, help=f"comma-separated subset of {','.join(JOBS)} (default: all)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per job (default 2: short jobs)")
    p.add_argument("--limit-train-batches", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per job (default 1, the examples' default)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="smoke test: the autoencoder, 1 epoch of 5 steps")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default benchmarks/results/short_jobs.json)")
    args = p.parse_args(argv)
    names = ["autoencoder"] if args.quick else (args.examples.split(",") if args.examples else list(JOBS))
    if args.quick:
        args.epochs, args.limit_train_batches = 1, 5
    unknown = sorted(set(names) - set(JOBS))
    if unknown:
        p.error(f"unknown examples {unknown}; choose from {', '.join(JOBS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lightfn-short-jobs-") as tmp:
        work = pathlib.Path(tmp)
        for name in names:
            eager, cold, warm = (run_job(name, mode, args, work) for mode in ("eager", "cold", "warm"))
            row = {"example": name, "eager_s": eager["exit_s"], "cold_s": cold["exit_s"], "warm_s": warm["exit_s"],
                   "cold_vs_eager": cold["exit_s"] / eager["exit_s"], "warm_vs_eager": warm["exit_s"] / eager["exit_s"],
                   "switched": "yes" if cold["switched"] else "no", "build_done_s": cold["build_done_s"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = C.format_table(rows, [
        ("example", "example", ""), ("eager_s", "jit=False (s)", "{:.1f}"), ("cold_s", "default, cold (s)", "{:.1f}"),
        ("cold_vs_eager", "cold / eager", "{:.2f}x"), ("switched", "switched in run", ""),
        ("build_done_s", "build done (s)", "{:.1f}"), ("warm_s", "default, warm (s)", "{:.1f}"),
        ("warm_vs_eager", "warm / eager", "{:.2f}x"),
    ])
    print(f"\nexamples, {args.epochs} epoch(s) each, {args.threads} thread(s), fresh processes (start to exit)")
    print(table)
    payload = {"benchmark": "short_jobs", "machine": C.machine_info(),
               "settings": {"epochs": args.epochs, "limit_train_batches": args.limit_train_batches,
                            "threads": args.threads, "examples": names}, "rows": rows, "table": table}
    print(f"wrote {C.write_json('short_jobs', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
