"""Smoke test of benchmarks/ddp_overhead.py: it launches torchrun itself, times both systems
for a handful of steps and writes a JSON report with every field filled."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


@pytest.mark.slow
def test_ddp_overhead_smoke(tmp_path):
    out = tmp_path / "ddp_overhead.json"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ddp_overhead.py"), "--eager", "--models", "autoencoder",
           "--warmup", "2", "--steps", "3", "--repeats", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (report["world_size"], report["device"], report["backend"]) == (2, "cpu", "gloo")
    assert (report["steps"], report["repeats"], report["warmup"], report["compiled"]) == (3, 2, 2, False)
    (row,) = report["results"]
    assert row["model"] == "autoencoder" and row["params"] == 784 * 64 + 64 + 64 * 3 + 3 + 3 * 64 + 64 + 64 * 784 + 784
    for key in ("lightfn_ms", "torch_ddp_ms", "speedup"):
        assert row[key] > 0, key
    assert row["max_param_diff"] <= 1e-5  # both systems trained the same model on the same batches
    assert "torch DDP ms" in proc.stdout and "autoencoder" in proc.stdout  # the printed table
