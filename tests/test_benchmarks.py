"""Smoke runs of benchmarks/*.py with a handful of steps, so the scripts cannot rot.

They check that each script runs end to end and writes its JSON with every field present
and positive; they time nothing (the numbers of a smoke run mean nothing). Systems whose
optional packages (the ``bench`` extra) are not installed are skipped by the script, and
the test then expects them listed as skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.compile]

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DATA = ROOT.parent / "shared" / "data" / "MNIST" / "raw"


def _run(script: str, out: pathlib.Path, *extra: str) -> dict:
    env = {**os.environ}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT.parent / ".inductor-cache"))
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--threads", "1", "--data-dir", str(DATA), "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def _positive(row: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(row[k], (int, float)) and row[k] > 0, (k, row)


def test_step_vs_eager(tmp_path):
    result = _run("step_vs_eager.py", tmp_path / "s.json")
    variants = {r["variant"]: r for r in result["variants"]}
    assert set(variants) == {"lightfn_jit", "lightfn_eager", "torch_adam", "torch_adam_fused"}
    for r in variants.values():
        _positive(r, "us_per_step", "cpu_us_per_step", "samples_per_s", "x_floor", "lightfn_jit_speedup")
        assert len(r["windows_us"]) == result["settings"]["repeats"]
    _positive(result, "speedup_vs_torch_adam", "flop_floor_us", "sgemm_flops_per_s", "eager_vs_torch_adam", "eager_cpu_vs_torch_adam")
    assert variants["lightfn_jit"]["lightfn_jit_speedup"] == 1.0


def test_ensemble(tmp_path):
    result = _run("ensemble.py", tmp_path / "e.json", "--batch-size", "8")
    variants = {r["variant"]: r for r in result["variants"]}
    assert set(variants) == {"ensemble_jit", "separate_jit"} and result["members"] == 8
    for r in variants.values():
        _positive(r, "us_per_step", "cpu_us_per_step", "us_per_member_step", "samples_per_s", "ensemble_speedup")
    _positive(result, "speedup_vs_separate", "flop_floor_us")
    _positive(result["gemm_cpu_us"], "ensemble_bmm", "separate_mm", "ensemble_concat_mm")


def test_seed_autoencoder(tmp_path):
    # The warm-cache probes run in fresh processes: the first-step fields are checked too.
    result = _run("seed_autoencoder.py", tmp_path / "a.json", "--probes", "warm", "--systems", "lightfn,torch")
    rows = {r["system"]: r for r in result["systems"]}
    assert set(rows) == {"lightfn", "torch"}
    for r in rows.values():
        _positive(r, "us_per_step", "cpu_us_per_step", "samples_per_s", "x_floor", "lightfn_speedup",
                  "first_step_warm_s", "peak_rss_mb")
        assert "first_step_cold_s" not in r
    _positive(result, "flop_floor_us", "step_flops")
    assert result["machine"]["versions"]["torch"]


def test_seed_autoencoder_other_systems(tmp_path):
    # Lightning and JAX: run when installed, reported as skipped (with the reason) when not.
    result = _run("seed_autoencoder.py", tmp_path / "o.json", "--probes", "none", "--systems", "lightning,jax_jit,jax_scan")
    rows = {r["system"]: r for r in result["systems"]}
    installed = {
        "lightning": importlib.util.find_spec("lightning") is not None,
        "jax_jit": importlib.util.find_spec("jax") is not None and importlib.util.find_spec("optax") is not None,
    }
    installed["jax_scan"] = installed["jax_jit"]
    for system, present in installed.items():
        if present:
            _positive(rows[system], "us_per_step", "samples_per_s", "x_floor", "final_loss")
        else:
            assert system in result["skipped"] and "not installed" in result["skipped"][system]
    assert all(r["lightfn_speedup"] is None for r in rows.values())  # lightfn was not run


def test_scaling(tmp_path):
    result = _run("scaling.py", tmp_path / "c.json")
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [("seed_ae", 16), ("seed_ae", 256)]
    for r in result["rows"]:
        _positive(r, "lightfn_us", "torch_us", "speedup", "lightfn_peak_mb", "torch_peak_mb", "memory_ratio", "grads_mb")
        # the donated step's peak holds at least its state; nothing is negative
        assert r["lightfn_extra_mb"] >= 0 and r["torch_extra_mb"] >= 0
        assert r["lightfn_peak_mb"] >= 3 * r["grads_mb"] * 0.99  # params + two Adam moments


def test_startup(tmp_path):
    # --quick: fresh processes for the rows that compile nothing, 5 steps of the main job.
    result = _run("startup.py", tmp_path / "st.json", "--rows", "import_torch,torch_loop,lightfn_eager,lightning,jax,cnn_eager")
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["import_torch", "torch_loop", "lightfn_eager", "lightning", "jax", "cnn_eager"]
    # the CNN's job (mnist_classifier's) is another job: its first step, no ratio to the main job's
    cnn = rows["cnn_eager"]
    _positive(cnn, "first_step_s", "first_step_after_own_import_s", "end_s")
    assert cnn["steps"] == 5 and "end_vs_torch_loop" not in cnn
    _positive(rows["import_torch"], "import_torch_s", "end_s", "exit_s")
    for name in ("torch_loop", "lightfn_eager"):
        r = rows[name]
        _positive(r, "import_torch_s", "first_step_s", "end_s", "exit_s", "end_vs_torch_loop")
        assert r["status"] == "ok" and r["steps"] == 5
        assert r["import_torch_s"] < r["first_step_s"] <= r["end_s"] <= r["exit_s"]
        assert r["first_step_after_import_torch_s"] == r["first_step_s"] - rows["import_torch"]["import_torch_s"]
    assert rows["torch_loop"]["end_vs_torch_loop"] == 1.0
    installed = {"lightning": any(importlib.util.find_spec(m) for m in ("lightning", "pytorch_lightning")),
                 "jax": all(importlib.util.find_spec(m) for m in ("jax", "optax"))}
    for system, present in installed.items():
        if present:
            _positive(rows[system], "first_step_s", "end_s")
        else:
            assert "not installed" in rows[system]["status"] and system in result["skipped"]
    assert result["settings"]["epochs"] == 1 and result["settings"]["limit_train_batches"] == 5


def test_short_jobs(tmp_path):
    # --quick: the autoencoder, 5 steps, eager / default on empty caches / default warm.
    result = _run("short_jobs.py", tmp_path / "sj.json")
    (row,) = result["rows"]
    assert row["example"] == "autoencoder" and row["switched"] in ("yes", "no")
    _positive(row, "eager_s", "cold_s", "warm_s", "cold_vs_eager", "warm_vs_eager", "build_done_s")
    assert row["build_done_s"] >= row["cold_s"]  # waited for after the cold process exited
    assert result["settings"]["epochs"] == 1 and result["settings"]["limit_train_batches"] == 5
