"""Exact resume: a fit killed (SIGKILL) or preempted (SIGTERM) and resumed from its last
checkpoint ends with the same bits as a run never interrupted.

The run (tests/fit_workers/resume_worker.py) has dropout in its loss, shuffled ArrayLoader
data with a ragged last batch, gradient accumulation over 2 batches, clipping, Adam,
validation, a step-schedule ModelCheckpoint, a top-2 ModelCheckpoint and an EarlyStopping
that stops it after exactly 3 epochs. The killed runs are children of one worker process
(forked after its imports), started while the reference runs in this process; each is then
resumed here. The compiled variant drops accumulation, clipping and validation to stay one
small graph.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightfn as lf
from lightfn._compile import aot as _aot
from lightfn.callbacks import EarlyStopping, ModelCheckpoint
from lightfn.fit import FitError, fit
from memory_logger import MemoryLogger

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "fit_workers"
sys.path.insert(0, str(WORKERS))
import resume_worker as w  # noqa: E402

# scenario -> (when the worker interrupts it, where its last checkpoint is: (epoch, batch, step))
# 6 batches per epoch; the step schedule saves every 3 steps, the top-2 at each epoch end.
KILLS = {
    # 10 steps done, last save at step 9: between the 2 micro-batches of an accumulation
    "mid-epoch": ("step:10", (1, 3, 9)),
    # killed right after the save at step 15 (the step after it ran, nothing of it saved)
    "right-after-a-checkpoint": ("step:16", (2, 3, 15)),
    # killed in epoch 1's end hook, after its validation: resumes before the epoch's end
    "at-epoch-boundary": ("epoch_end:1", (1, 6, 12)),
    # killed right after epoch 0's end checkpoint: resumes at the start of epoch 1
    "after-epoch-end-checkpoint": ("step:7", (1, 0, 6)),
}
SIGTERM_STEP = 8


@dataclasses.dataclass
class Run:
    state: object
    callbacks: list
    files: list
    logger: MemoryLogger


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _worker(base, *runs, jit=False):
    """Start the worker: one forked child per ``(name, when)``, interrupted as asked."""
    cmd = [sys.executable, str(WORKERS / "resume_worker.py"), str(base), *(f"{n}={w}" for n, w in runs)]
    cmd += ["--jit", jit] if jit else []
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _statuses(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    statuses = dict(line.split() for line in out.splitlines() if line.strip())
    return {k: int(v) for k, v in statuses.items()}, err


def _files(dirpath):
    return sorted(p.name for p in Path(dirpath).iterdir())


def _fit(dirpath, jit=False, **kw):
    logger = MemoryLogger()
    cbs = w.make_callbacks(dirpath, jit=jit)
    state = fit(callbacks=cbs, loggers=[logger], **{**w.make_run(jit=jit), **kw})
    return Run(state, cbs, _files(dirpath), logger)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every interrupted run (one subprocess), run the reference meanwhile, collect."""
    base = tmp_path_factory.mktemp("resume")
    proc = _worker(base, *((name, when) for name, (when, _) in KILLS.items()), ("sigterm", f"sigterm:{SIGTERM_STEP}"))
    reference = _fit(base / "reference")
    statuses, err = _statuses(proc)
    return dict(base=base, reference=reference, statuses=statuses, stderr=err)


def assert_bit_identical(actual, expected):
    a, b = lf.tree.leaves_with_path(actual), lf.tree.leaves_with_path(expected)
    assert [lf.tree.keystr(p) for p, _ in a] == [lf.tree.keystr(p) for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{lf.tree.keystr(path)} differs"


def assert_same_callbacks(resumed, reference):
    steps, best, stopper = resumed.callbacks
    ref_steps, ref_best, ref_stopper = reference.callbacks
    assert stopper.state_dict() == ref_stopper.state_dict()
    assert (stopper.wait_count, stopper.stopped_epoch) == (2, 2)
    for cb, ref in ((steps, ref_steps), (best, ref_best)):
        assert {Path(p).name: s for p, s in cb.best_k_models.items()} == {
            Path(p).name: s for p, s in ref.best_k_models.items()}
        assert Path(cb.best_model_path).name == Path(ref.best_model_path).name
    assert best.best_model_score == ref_best.best_model_score
    assert resumed.files == reference.files  # top-k deletions continued; no stray files


def assert_same_logs(resumed, reference):
    """Everything the resumed run logged equals what the reference logged at that step."""
    ref = reference.logger.by_step()
    logged = resumed.logger.by_step()
    assert logged
    for step, metrics in logged.items():
        assert metrics == {k: ref[step][k] for k in metrics}, step


def test_reference_run_is_what_the_scenarios_assume(runs):
    ref = runs["reference"]
    assert int(ref.state.step) == 18  # EarlyStopping: 3 validations, then stop
    # val/loss falls every epoch: the top 2 are the last two epochs; the step schedule keeps its latest
    pattern = [r"epoch=1-step=12-val_loss=\d+\.\d{4}", r"epoch=2-step=18-val_loss=\d+\.\d{4}", r"epoch=2-step=18", "last"]
    assert len(ref.files) == 4 and all(re.fullmatch(p + r"\.safetensors", f) for p, f in zip(pattern, ref.files)), ref.files
    # the final last.safetensors is the final state, bit for bit
    last = lf.load(runs["base"] / "reference" / "last.safetensors")
    assert_bit_identical(last["params"], ref.state.params)
    assert last["loop"]["step"] == 18 and last["loop"]["stop_requested"]


@pytest.mark.parametrize("scenario", list(KILLS))
def test_sigkill_then_resume_from_last_is_bit_identical(runs, scenario):
    assert runs["statuses"].get(scenario) == -signal.SIGKILL, runs["stderr"][-3000:]
    dirpath = runs["base"] / scenario
    loop = lf.load(dirpath / "last.safetensors", subtree="loop")
    assert (loop["epoch"], loop["batch"], loop["step"]) == KILLS[scenario][1]
    resumed = _fit(dirpath, resume_from="last")
    assert_bit_identical(resumed.state, runs["reference"].state)
    assert_same_callbacks(resumed, runs["reference"])
    assert_same_logs(resumed, runs["reference"])


def test_sigterm_saves_a_checkpoint_exits_0_and_resumes_exactly(runs):
    assert runs["statuses"].get("sigterm") == 0, runs["stderr"][-3000:]
    assert "SIGTERM at epoch 1, step 8" in runs["stderr"] and "finished without" not in runs["stderr"]
    dirpath = runs["base"] / "sigterm"
    loop = lf.load(dirpath / "last.safetensors", subtree="loop")
    # saved at the step boundary after the signal, mid-epoch, where no schedule saves
    assert (loop["epoch"], loop["batch"], loop["step"]) == (1, 2, SIGTERM_STEP)
    resumed = _fit(dirpath, resume_from="last")
    assert_bit_identical(resumed.state, runs["reference"].state)
    assert_same_callbacks(resumed, runs["reference"])
    assert_same_logs(resumed, runs["reference"])


def test_resume_from_an_explicit_path_of_a_run_stopped_in_process(runs, tmp_path):
    # max_steps=9 stops mid-epoch 1 (and then closes that epoch: validation, epoch-end
    # checkpoints); the step-9 file was written before all that, so it resumes exactly.
    stopped = _fit(tmp_path, max_steps=9)
    assert int(stopped.state.step) == 9 and "epoch=1-step=9.safetensors" in stopped.files
    resumed = _fit(tmp_path, resume_from=tmp_path / "epoch=1-step=9.safetensors")
    assert_bit_identical(resumed.state, runs["reference"].state)
    assert resumed.callbacks[2].state_dict() == runs["reference"].callbacks[2].state_dict()


def test_resume_with_a_list_of_batches_is_exact_and_other_seeds_are_refused(tmp_path):
    run = w.make_run()
    batches = list(run["train_data"].iter_epoch(0))  # the same batches every epoch
    ref = _fit(tmp_path / "ref", train_data=batches)
    _fit(tmp_path / "cut", train_data=batches, max_steps=9)
    resumed = _fit(tmp_path / "cut", train_data=batches, resume_from=tmp_path / "cut" / "epoch=1-step=9.safetensors")
    assert_bit_identical(resumed.state, ref.state)
    assert_same_logs(resumed, ref)

    _fit(tmp_path / "seeded", max_steps=4)
    other = lf.data.ArrayLoader(batches[0], batch_size=4, seed=12)  # not the seed the checkpoint recorded
    with pytest.raises(FitError, match="order seed is 11.*seed=11"):
        _fit(tmp_path / "seeded", train_data=other, resume_from="last")
    with pytest.raises(FitError, match="no such checkpoint"):
        _fit(tmp_path / "empty", resume_from="last")


def test_resumed_callbacks_get_their_saved_state_not_a_fresh_one(tmp_path):
    _fit(tmp_path, max_steps=7)  # validations after epochs 0 and 1 (the stop closes epoch 1)
    ckpt = lf.load(tmp_path / "last.safetensors")
    # saved when the stop closed epoch 1, at its position: 1 batch into it
    assert (ckpt["loop"]["step"], ckpt["loop"]["epoch"], ckpt["loop"]["batch"]) == (7, 1, 1)
    cbs = [ModelCheckpoint(tmp_path, every_n_steps=w.EVERY_N_STEPS, save_top_k=1),
           ModelCheckpoint(tmp_path, monitor="val/loss", save_top_k=2),
           EarlyStopping(monitor="val/loss", patience=2, min_delta=1e9)]
    # resume with max_steps=7 again: nothing left to train; only the saved state is loaded
    fit(callbacks=cbs, resume_from="last", **{**w.make_run(), "max_steps": 7})
    assert cbs[2].wait_count == 1 and cbs[2].best_score < float("inf")
    assert sorted(Path(p).name.split("-val")[0] for p in cbs[1].best_k_models) == ["epoch=0-step=6", "epoch=1-step=7"]
    assert Path(cbs[0].best_model_path).name == "epoch=0-step=6.safetensors"


def test_a_resumed_run_counts_the_time_before_its_checkpoint(tmp_path):
    # The loop position carries the run's elapsed time: callbacks see it as
    # ctx.total_elapsed (a Timer's clock), ctx.elapsed stays this fit call's own.
    class Clock(lf.callbacks.Callback):
        def __init__(self):
            self.seen = []

        def on_fit_start(self, ctx):
            self.seen.append((ctx.elapsed, ctx.total_elapsed))

    _fit(tmp_path, max_steps=5)
    saved = lf.load(tmp_path / "last.safetensors", subtree="loop")["elapsed"]
    assert saved > 0
    clock, timer = Clock(), lf.callbacks.Timer()
    fit(callbacks=[clock, timer, ModelCheckpoint(tmp_path, save_top_k=0)], resume_from="last",
        **{**w.make_run(), "max_steps": 7})
    (elapsed, total), = clock.seen
    assert elapsed < total and total - elapsed == pytest.approx(saved)
    assert timer.time_elapsed() > saved


def test_a_run_stopped_by_max_steps_mid_epoch_resumes_the_rest_of_that_epoch(tmp_path):
    # 44 batches per epoch: max_steps=30 stops inside epoch 0, whose end (means, validation,
    # the epoch-end checkpoint) still runs; resumed with max_steps=60 it trains batches
    # 30..43 of epoch 0 and 16 of epoch 1, exactly what one run to 60 does.
    run = w.make_run()
    batches = list(run["train_data"].iter_epoch(0))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    train = lf.data.ArrayLoader((x, y), batch_size=1, shuffle=True, seed=5)
    kw = {**run, "train_data": train, "max_epochs": None, "log_every_n_steps": 7}

    def go(dirpath, max_steps, **extra):
        logger = MemoryLogger()
        state = fit(**{**kw, "max_steps": max_steps, **extra}, loggers=[logger],
                    callbacks=[ModelCheckpoint(dirpath, save_top_k=0)])
        return state, logger

    ref, ref_log = go(tmp_path / "ref", 60)
    stopped, _ = go(tmp_path / "cut", 30)
    loop = lf.load(tmp_path / "cut" / "last.safetensors", subtree="loop")
    assert (loop["epoch"], loop["batch"], loop["step"]) == (0, 30, 30)
    resumed, log = go(tmp_path / "cut", 60, resume_from="last")
    assert int(stopped.step) == 30 and int(resumed.step) == 60
    assert_bit_identical(resumed, ref)
    # epoch 0's mean covers all its 44 batches (the sums of the first 30 were carried over)
    assert log.values("train/loss_epoch") == ref_log.values("train/loss_epoch")
    assert [s for s, _ in log.values("train/loss_epoch")] == [44, 60]
    assert log.values("val/loss") == ref_log.values("val/loss")


@pytest.mark.compile
def test_compiled_run_killed_mid_epoch_resumes_bit_identical(tmp_path):
    # 5 equal batches per epoch, one fused graph (step + metric sums, donated state); saves
    # every 3 steps; killed after step 8, so it resumes from step 6 and redoes 7 and 8
    proc = _worker(tmp_path, ("killed", "step:8"), jit="sync")
    ref = _fit(tmp_path / "ref", jit="sync", max_epochs=3)
    statuses, err = _statuses(proc, timeout=600)
    assert statuses == {"killed": -signal.SIGKILL}, err[-3000:]
    assert lf.load(tmp_path / "killed" / "last.safetensors", subtree="loop")["step"] == 6
    resumed = _fit(tmp_path / "killed", jit="sync", max_epochs=3, resume_from="last")
    assert int(resumed.state.step) == 15
    assert_bit_identical(resumed.state, ref.state)


@pytest.mark.compile
def test_background_compiled_run_killed_after_its_switch_resumes_bit_identical(tmp_path, monkeypatch):
    # jit="background": epoch 0 (steps 1-5) eager while a child builds the graph; with
    # LIGHTFN_BACKGROUND_WAIT=1 the switch waits for it at epoch 0's end, so steps 6+ are
    # compiled in every run. The killed run's checkpoint at step 6 records the switch at
    # step 5; resumed there it must run compiled from its first step, loading the artifact
    # its interrupted run built, and end with the reference's bits. The reference builds
    # in a cache of its own, so it too starts eagerly.
    monkeypatch.setenv("LIGHTFN_BACKGROUND_WAIT", "1")
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / "cache-killed"))
    proc = _worker(tmp_path, ("killed", "step:8"), jit="background")
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / "cache-ref"))
    ref = _fit(tmp_path / "ref", jit="background", max_epochs=3)
    statuses, err = _statuses(proc, timeout=600)
    assert statuses == {"killed": -signal.SIGKILL}, err[-3000:]
    loop = lf.load(tmp_path / "killed" / "last.safetensors", subtree="loop")
    assert loop["step"] == 6 and json.loads(loop["compiled"]) == {"train": 5}
    assert json.loads(lf.load(tmp_path / "ref" / "last.safetensors", subtree="loop")["compiled"]) == {"train": 5}

    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / "cache-killed"))
    _aot.reset_stats()
    resumed = _fit(tmp_path / "killed", jit="background", max_epochs=3, resume_from="last")
    assert _aot.stats()["loads"] == 1 and _aot.stats()["traces"] == 0  # loaded, not built again
    assert int(resumed.state.step) == 15
    assert_bit_identical(resumed.state, ref.state)
    # The test has teeth: eager steps after step 5 would end elsewhere.
    eager = _fit(tmp_path / "eager", jit=False, max_epochs=3)
    assert any(not torch.equal(a, b) for a, b in zip(lf.tree.leaves(eager.state), lf.tree.leaves(ref.state)))
