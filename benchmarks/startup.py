"""Results in seconds: time from process start to the first train step and to the end of the main job.

    python benchmarks/startup.py            # all rows, 20 epochs: table + results/startup.json
    python benchmarks/startup.py --quick    # smoke test: eager rows only, 5 steps

Every figure comes from a fresh process (``benchmarks/_startup_probe.py``), timed from just
before the parent starts it: the interpreter's start and every import count, as a user
running the job sees them. The job is the main job's (``bash scripts/run.sh`` runs
``examples/autoencoder.py``: the seed autoencoder, Adam, batch 64, 20 epochs with
validation after each; lightfn also writes its TensorBoard/CSV logs and checkpoints).
Rows:

- ``import_torch``: a process that only runs ``import torch``; its time is subtracted from
  the others' first step ("first step - import torch");
- ``lightfn_cold`` / ``lightfn_warm``: fit's default (``jit=True``: training starts
  eagerly while a child process builds the AOT artifacts, and switches when they are built;
  a later process loads them before its first step) with empty ``TORCHINDUCTOR_CACHE_DIR``
  and ``LIGHTFN_CACHE_DIR`` in a new temporary folder, then a second process with the same
  folders once the first one's background build has finished (``build_done_s``: when it
  had, counted from the cold process's start). (Inductor's precompiled header lives in the
  system temp folder, outside both: cold here means a new cache folder on a machine that
  has compiled before.)
- ``lightfn_sync_cold`` / ``lightfn_sync_warm``: ``jit="sync"``, ``torch.compile`` before
  the first step, the same way with folders of their own;
- ``lightfn_aot_cold`` / ``lightfn_aot_warm``: ``jit="sync"`` with ``LIGHTFN_AOT=1`` (the
  AOT artifacts built before the first step);
- ``lightfn_eager``: ``fit(..., jit=False)``;
- ``torch_loop``: a plain ``torch.optim.Adam`` loop over the same data;
- ``lightning``, ``jax``: the same job in Lightning and in JAX + optax (``jax.jit`` step),
  when importable; else the row says "not installed" (nothing is installed for it);
- ``cnn_eager`` / ``cnn_cold`` / ``cnn_warm``: another job, for its first step:
  ``examples/mnist_classifier.py``'s BatchNorm + dropout CNN (batch 128, ``--cnn-epochs``,
  default 1), ``jit=False``, then fit's default on empty folders of its own and again
  once the cold row's build has finished.

``--quick`` runs 1 epoch of 5 train and 2 validation batches, and by default only the rows
that compile nothing (import_torch, torch_loop, lightfn_eager).
"""

from __future__ import annotations

import argparse
import importlib.util
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

PROBE = C.HERE / "_startup_probe.py"
ROWS = ("import_torch", "torch_loop", "lightfn_eager", "lightfn_cold", "lightfn_warm", "lightfn_sync_cold",
        "lightfn_sync_warm", "lightfn_aot_cold", "lightfn_aot_warm", "lightning", "jax", "cnn_eager", "cnn_cold", "cnn_warm")
QUICK_ROWS = ("import_torch", "torch_loop", "lightfn_eager")
_SYSTEM = {"lightfn_cold": "lightfn", "lightfn_warm": "lightfn", "lightfn_sync_cold": "lightfn_sync",
           "lightfn_sync_warm": "lightfn_sync", "lightfn_aot_cold": "lightfn_sync", "lightfn_aot_warm": "lightfn_sync",
           "cnn_eager": "lightfn_cnn_eager", "cnn_cold": "lightfn_cnn", "cnn_warm": "lightfn_cnn"}
# rows whose (detached) background build the next rows must not share the cores with
_BUILDS = ("lightfn_cold", "cnn_cold")
_NEEDS = {"lightning": (("lightning", "pytorch_lightning"),), "jax": (("jax",), ("optax",))}


def missing(row: str) -> str | None:
    """Why ``row`` cannot run here (its packages are not importable), or None."""
    for alternatives in _NEEDS.get(row, ()):
        if not any(importlib.util.find_spec(m) is not None for m in alternatives):
            return f"not installed ({' / '.join(alternatives)})"
    return None


def run_row(row: str, args: argparse.Namespace, work: pathlib.Path, env: dict[str, str]) -> dict[str, Any]:
    """One fresh process for ``row``: its marks (seconds since start) plus ``exit_s``."""
    out = work / row
    argv = [sys.executable, str(PROBE), _SYSTEM.get(row, row), "--data-dir", str(args.data_dir), "--out", str(out),
            "--epochs", str(args.cnn_epochs if row.startswith("cnn_") else args.epochs), "--threads", str(args.threads)]
    for flag, value in (("--limit-train-batches", args.limit_train_batches), ("--limit-val-batches", args.limit_val_batches)):
        if value is not None:
            argv += [flag, str(value)]
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout,
                          env={**os.environ, **env, "LIGHTFN_BENCH_T0": repr(t0)}, cwd=C.HERE.parent)
    exit_s = time.time() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"{row} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return {**json.loads(lines[-1]), "exit_s": exit_s}


def measure(rows: list[str], args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, str]]:
    results, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="lightfn-startup-") as tmp:
        work = pathlib.Path(tmp)
        # each family's cold and warm rows share cache folders, empty before the cold run
        def caches(family: str) -> dict[str, str]:
            return {"TORCHINDUCTOR_CACHE_DIR": str(work / family / "inductor"),
                    "LIGHTFN_CACHE_DIR": str(work / family / "lightfn")}

        families = {"lightfn": caches("default"), "lightfn_sync": caches("sync"),
                    "lightfn_aot": {**caches("aot"), "LIGHTFN_AOT": "1"}, "cnn": caches("cnn")}
        for row in rows:
            why = missing(row)
            if why is not None:
                skipped[row] = why
                results.append({"row": row, "status": why})
                print(f"{row}: {why}", flush=True)
                continue
            env = families[row.rsplit("_", 1)[0]] if row in _SYSTEM else {}
            t0 = time.time()
            r = {"row": row, "status": "ok", **run_row(row, args, work, env)}
            if row in _BUILDS:
                # the warm row (and every other row) must not share the cores with the build
                C.wait_for_build(pathlib.Path(env["LIGHTFN_CACHE_DIR"]))
                r["build_done_s"] = time.time() - t0
            results.append(r)
            print(f"{row}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_s")), flush=True)
    return results, skipped


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Derived columns: first step after ``import torch`` (the import_torch row's time), and
    each row's process exit relative to the torch loop's and Lightning's."""
    by = {r["row"]: r for r in results if r["status"] == "ok"}
    base = by.get("import_torch", {}).get("import_torch_s")
    for r in results:
        if r["status"] != "ok":
            continue
        if "first_step_s" in r:
            # the same difference within the row's own process: less exposed to one slow import
            r["first_step_after_own_import_s"] = r["first_step_s"] - r["import_torch_s"]
            if base is not None:
                r["first_step_after_import_torch_s"] = r["first_step_s"] - base
        for ref in ("torch_loop", "lightning"):
            # end to end = until the process has exited (a background build does not hold it);
            # the CNN rows run another job
            if ref in by and "first_step_s" in r and not r["row"].startswith("cnn_"):
                r[f"end_vs_{ref}"] = r["exit_s"] / by[ref]["exit_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=pathlib.Path, default=C.DEFAULT_DATA_DIR,
                   help="folder with MNIST IDX files (default ../shared/data/MNIST/raw)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)} (default: all; --quick: "
                   f"{','.join(QUICK_ROWS)})")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the main job (default 20)")
    p.add_argument("--cnn-epochs", type=int, default=1, help="epochs of the cnn_* rows' job (default 1: they are there "
                   "for their first step)")
    p.add_argument("--limit-train-batches", type=int, default=None, help="train batches per epoch (default: all)")
    p.add_argument("--limit-val-batches", type=int, default=None, help="validation batches per epoch (default: all)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads in each job (default 1, as the main job)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a process is given up (default 1800)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch of 5 steps, eager rows only")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON output path (default benchmarks/results/startup.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.limit_train_batches, args.limit_val_batches = 1, 5, 2
    rows = args.rows.split(",") if args.rows else list(QUICK_ROWS if args.quick else ROWS)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    for family in ("lightfn", "lightfn_sync", "lightfn_aot", "cnn"):
        if f"{family}_warm" in rows and f"{family}_cold" not in rows:
            p.error(f"{family}_warm reuses the cache {family}_cold fills: ask for both")

    results, skipped = measure(rows, args)
    add_ratios(results)
    table = C.format_table(results, [
        ("row", "row", ""), ("import_torch_s", "import torch (s)", "{:.2f}"), ("first_step_s", "first step (s)", "{:.2f}"),
        ("first_step_after_import_torch_s", "first step - import torch (s)", "{:.2f}"),
        ("first_step_after_own_import_s", "(same, own import)", "{:.2f}"),
        ("end_s", "job end (s)", "{:.1f}"), ("exit_s", "process exit (s)", "{:.1f}"),
        ("build_done_s", "background build done (s)", "{:.1f}"), ("end_vs_torch_loop", "exit / torch loop", "{:.2f}x"),
        ("end_vs_lightning", "exit / Lightning", "{:.2f}x"), ("status", "status", ""),
    ])
    def steps(cnn: bool) -> Any:
        return next((r["steps"] for r in results if r.get("steps") and r["row"].startswith("cnn_") == cnn), None)

    jobs = [f"main job (seed autoencoder, {args.epochs} epoch(s), {steps(False)} steps)" if steps(False) else "",
            f"cnn_* rows: mnist_classifier's CNN ({args.cnn_epochs} epoch(s), {steps(True)} steps)" if steps(True) else ""]
    print(f"\n{'; '.join(j for j in jobs if j)}; {args.threads} thread(s), fresh processes")
    print(table)
    payload = {"benchmark": "startup", "machine": C.machine_info(),
               "settings": {"epochs": args.epochs, "limit_train_batches": args.limit_train_batches,
                            "limit_val_batches": args.limit_val_batches, "threads": args.threads, "rows": rows},
               "rows": results, "skipped": skipped, "table": table}
    print(f"wrote {C.write_json('startup', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
