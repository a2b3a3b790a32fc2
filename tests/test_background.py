"""fit's background compile (lightfn/fit/_background.py, lightfn/_compile/background.py).

A cold run trains eagerly while a forked child builds the AOT artifacts, switches at a step
it records, and a warm run loads them before its first step. Counters, recorded steps and
parity with ``jit=False`` / ``jit="sync"`` are asserted, never timings. The SIGKILL-and-resume
case is in test_resume.py, beside the other interrupted runs.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest
import torch

import lightfn as lf
from lightfn._compile import aot as _aot
from lightfn._compile import background
from lightfn._compile.jit import Jitted
from lightfn.fit._fit import jit_mode

N, D, BATCH = 32, 5, 8  # 4 batches per epoch


def loss_fn(params, batch):
    x, y = batch
    err = x @ params["w"] + params["b"] - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def problem():
    g = torch.Generator().manual_seed(0)
    x, vx = torch.randn(N, D, generator=g), torch.randn(16, D, generator=g)
    w = torch.randn(D, generator=g)
    opt = lf.optim.adam(0.05)
    state = lf.TrainState.create(params={"w": torch.zeros(D), "b": torch.zeros(())}, optimizer=opt)
    train = lf.data.ArrayLoader((x, x @ w), batch_size=BATCH, shuffle=True, seed=5)
    val = lf.data.ArrayLoader((vx, vx @ w), batch_size=BATCH, shuffle=False)
    return lf.train_step(loss_fn, opt), state, train, val


class Said(lf.callbacks.Callback):
    """Keeps fit's progress announcements, and the params at the end of epoch 0."""

    def __init__(self):
        self.lines = []
        self.epoch0 = None

    def on_announce(self, ctx, text):
        self.lines.append((ctx.step, text))
        return True

    def on_epoch_end(self, ctx):
        if ctx.epoch == 0:
            self.epoch0 = lf.tree.map(torch.clone, ctx.state.params)


def run(tmp_path, name, jit, said=None, **kw):
    step, state, train, val = problem()
    said, ckpt = said or Said(), lf.callbacks.ModelCheckpoint(tmp_path / name, save_last=True, save_top_k=0)
    out = lf.fit(step, state, train, val_data=val, eval_step=lf.eval_step(loss_fn), jit=jit, progress=False,
                 callbacks=[said, ckpt], **{"max_epochs": 3, **kw})
    loop = lf.load(tmp_path / name / "last.safetensors", subtree="loop")
    return out, said.lines, json.loads(loop.get("compiled", "{}"))


def texts(lines):
    return [text for _, text in lines]


def assert_equal_trees(a, b):
    for x, y in zip(lf.tree.leaves(a), lf.tree.leaves(b), strict=True):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------ no compile


def test_jit_modes():
    step, *_ = problem()
    cpu = torch.device("cpu")
    assert jit_mode(True, step, False, cpu) == "background"
    assert jit_mode("sync", step, False, cpu) == "sync"
    assert jit_mode(False, step, False, cpu) == "off"
    assert jit_mode(True, lf.jit(step, donate=True), False, cpu) == "sync"  # the user's own lf.jit
    assert jit_mode(True, step, True, cpu) == "sync"  # ddp / fsdp
    with pytest.raises(lf.FitError, match="jit='background' needs one CPU process"):
        jit_mode("background", step, True, cpu)
    with pytest.raises(lf.FitError, match=r"jit='fast': use True \(the default\), False, 'sync' or 'background'"):
        jit_mode("fast", step, False, cpu)


def test_jit_off_by_environment_means_eager_in_every_mode(monkeypatch):
    monkeypatch.setenv("LIGHTFN_DISABLE_JIT", "1")
    step, *_ = problem()
    assert jit_mode(True, step, False, torch.device("cpu")) == "sync"  # sync with lf.jit disabled: eager


def test_the_builder_runs_jobs_in_a_detached_child_and_reports_each(tmp_path, capfd):
    builder = background.Builder()

    def good():
        print("the child's output goes nowhere")
        (tmp_path / "built").write_text(str(os.getpid()))

    def bad():
        raise ValueError("no such op\nsecond line")

    # prepare: what a process whose forks cannot run autograd does first, here (the suite
    # may have compiled autograd before); these jobs need no autograd, so it is the job.
    builder.submit("bad", bad, prepare=lambda: bad)
    builder.submit("good", good, prepare=lambda: good, first=True)
    assert builder.status("good") == "queued" and builder.busy
    builder.start()
    assert builder.status("good") == "building"
    builder.poll(wait=True)
    assert builder.status("good") == "ready" and builder.status("bad") == "failed: ValueError: no such op"
    assert not builder.busy and builder.status("other") is None
    child = int((tmp_path / "built").read_text())
    assert child != os.getpid()
    assert "goes nowhere" not in capfd.readouterr().out


def test_a_child_that_dies_fails_its_jobs():
    builder = background.Builder()
    def die():
        os.kill(os.getpid(), 9)

    builder.submit("killed", die, prepare=lambda: die)
    builder.start()
    builder.poll(wait=True)
    assert builder.status("killed") == "failed: the build process ended without a result"


def test_a_step_the_cache_cannot_capture_trains_eagerly_bit_for_bit_like_jit_false(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LIGHTFN_BACKGROUND_WAIT", "1")

    def branchy(params, batch):
        loss, metrics = loss_fn(params, batch)
        if loss.item() > 1e9:  # data-dependent Python: runs eagerly, cannot be captured
            loss = loss * 0
        return loss, metrics

    def go(jit):
        step, state, train, _ = problem()
        said = Said()
        out = lf.fit(lf.train_step(branchy, step.optimizer), state, train, jit=jit, max_epochs=2, progress=False,
                     callbacks=[said])
        return out, texts(said.lines)

    background_run, said = go(True)
    eager_run, _ = go(False)
    assert_equal_trees(background_run, eager_run)
    failed = [t for t in said if t.startswith("background compile of the train step failed")]
    assert len(failed) == 1 and failed[0].endswith("it runs eagerly"), said


# ------------------------------------------------------------------------------ compiled


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("aot-cache")


@pytest.mark.compile
def test_a_cold_run_trains_eagerly_then_switches_at_a_recorded_step(tmp_path, monkeypatch, cache):
    # With LIGHTFN_BACKGROUND_WAIT=1 the switch waits for the build at epoch 0's end (step
    # 4): epoch 0 is eager, bit for bit like jit=False; the rest runs the built graphs.
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(cache))
    monkeypatch.setenv("LIGHTFN_BACKGROUND_WAIT", "1")
    _aot.reset_stats()
    said = Said()
    out, lines, compiled = run(tmp_path, "cold", True, said=said)
    assert compiled == {"train": 4, "eval": 4}
    assert _aot.stats()["builds"] == 0 and _aot.stats()["loads"] == 2  # built by the child, loaded here
    assert texts(lines)[0] == "compiling in background (training eagerly meanwhile)"
    assert [(s, t.split(": ")[1]) for s, t in lines if t.startswith("compiled (")] == [
        (4, "the train and eval steps now run compiled")]

    eager, _, _ = run(tmp_path, "eager", False, max_epochs=1)
    assert_equal_trees(said.epoch0, eager.params)  # epoch 0 ran eagerly: the same bits as jit=False
    full_eager, _, _ = run(tmp_path, "eager-3", False)
    assert any(not torch.equal(a, b) for a, b in zip(lf.tree.leaves(out.params), lf.tree.leaves(full_eager.params)))
    for a, b in zip(lf.tree.leaves(out.params), lf.tree.leaves(full_eager.params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # compiled epochs: float rounding only


@pytest.mark.compile
def test_a_warm_run_loads_both_graphs_before_its_first_step(tmp_path, monkeypatch, cache):
    from lightfn.fit import _accumulate

    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(cache))
    monkeypatch.setenv("LIGHTFN_BACKGROUND_WAIT", "1")
    run(tmp_path, "settle", True, max_epochs=1)  # builds, unless the cold test did
    _aot.reset_stats()
    monkeypatch.setattr(_accumulate, "abstract_eval", lambda *a: pytest.fail("traced a remembered step"))
    out, lines, compiled = run(tmp_path, "warm", True)
    assert compiled == {"train": 0, "eval": 0}
    assert _aot.stats() == {"traces": 0, "builds": 0, "loads": 2, "rebuilds": 0, "fallbacks": 0}
    assert texts(lines)[:2] == ["the eval step runs compiled (loaded from the cache)",
                                "the train step runs compiled (loaded from the cache)"]
    # The same artifacts, compiled from step 0 either way: jit="sync" with the AOT cache.
    monkeypatch.setenv("LIGHTFN_AOT", "1")
    sync, _, _ = run(tmp_path, "sync", "sync")
    assert_equal_trees(out, sync)


@pytest.mark.compile
def test_a_short_run_does_not_wait_and_its_build_lands_for_the_next_run(tmp_path, monkeypatch):
    # The build is held until the run has ended (a gate file), so "ended first" holds by
    # construction, not by timing; then it lands and the next run loads it.
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / "cache"))
    gate = tmp_path / "gate"
    store = Jitted.store

    def gated_store(self, *args, **kwargs):
        _after_gate(gate, lambda: store(self, *args, **kwargs))

    prepare = Jitted.prepare

    def gated_prepare(self, *args, **kwargs):  # a process whose forks cannot run autograd
        package = prepare(self, *args, **kwargs)
        return lambda: _after_gate(gate, package)

    monkeypatch.setattr(Jitted, "store", gated_store)
    monkeypatch.setattr(Jitted, "prepare", gated_prepare)
    _, lines, compiled = run(tmp_path, "short", True, max_epochs=1)
    assert compiled == {}
    assert texts(lines)[-1] == "the compiled step builds in the background now; a later run with this step loads it"
    gate.write_text("")
    manifests = []
    for _ in range(3000):  # the detached child builds both graphs
        manifests = [p for p in (tmp_path / "cache" / "aot").glob("*.json") if not p.name.startswith(".")]
        if len(manifests) == 2:
            break
        time.sleep(0.1)
    with background_lock(tmp_path / "cache" / "aot"):  # the child has finished writing
        pass
    _, lines, compiled = run(tmp_path, "next", True, max_epochs=1)
    assert compiled == {"train": 0, "eval": 0}


def test_worth_building_weighs_the_time_left_against_the_build():
    from lightfn._compile.background import PAYOFF, worth_building

    assert worth_building(eager_left=None, build_seconds=20.0)  # unbounded: always
    assert worth_building(eager_left=PAYOFF * 20.0, build_seconds=20.0)
    assert not worth_building(eager_left=PAYOFF * 20.0 - 0.1, build_seconds=20.0)
    assert not worth_building(eager_left=5.0, build_seconds=20.0)


def test_build_seconds_are_read_from_the_cache_and_bad_records_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path))
    assert background.build_seconds("train") is None
    (tmp_path / "aot").mkdir()
    (tmp_path / "aot" / ".build-seconds.json").write_text('{"train": 12.5, "eval": -1}')
    assert background.build_seconds("train") == 12.5 and background.build_seconds("eval") is None
    (tmp_path / "aot" / ".build-seconds.json").write_text("not json")
    assert background.build_seconds("train") is None


def _no_op_builds(monkeypatch, tmp_path, train_seconds):
    """Builds that do nothing (so nothing loads and the steps stay eager), with a recorded
    build time of ``train_seconds`` for the policy to weigh."""
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "aot").mkdir(parents=True)
    (tmp_path / "cache" / "aot" / ".build-seconds.json").write_text(json.dumps({"train": train_seconds}))
    monkeypatch.setattr(Jitted, "store", lambda self, *a, **k: None)
    monkeypatch.setattr(Jitted, "prepare", lambda self, *a, **k: (lambda: None))


def test_a_run_too_short_for_its_build_trains_undisturbed_and_builds_at_its_end(tmp_path, monkeypatch):
    # 80 steps: the decision comes after at most 50 measured ones, with 28 or more left
    # (well under a second) against a build recorded at 1000 s: the build waits for the end.
    _no_op_builds(monkeypatch, tmp_path, 1000.0)
    _, lines, compiled = run(tmp_path, "short", True, max_epochs=20)
    said = texts(lines)
    assert compiled == {}
    assert not any(t.startswith("compiling in background") for t in said)
    held = next(i for i, t in enumerate(said) if t.startswith("training eagerly: about "))
    assert "too short to use a compile (about 1000 s here)" in said[held]
    assert 3 <= lines[held][0] <= 51  # after 2 unmeasured steps, and 50 measured at most (or 0.25 s)
    assert said[-1] == "the compiled step builds in the background now; a later run with this step loads it"


def test_a_run_long_enough_for_its_build_starts_it_at_once(tmp_path, monkeypatch):
    _no_op_builds(monkeypatch, tmp_path, 0.001)
    _, lines, _ = run(tmp_path, "long", True, max_epochs=20)
    said = texts(lines)
    assert not any(t.startswith("training eagerly") for t in said)
    step, _ = next((s, t) for s, t in lines if t.startswith("compiling in background"))
    assert 3 <= step <= 51
    # the no-op build reports ready, finds nothing to load, and says so once
    assert sum(t.startswith("background compile of the train step failed") for t in said) == 1


def _after_gate(gate, package):
    while not gate.exists():
        time.sleep(0.05)
    package()


def background_lock(folder):
    from lightfn._compile.store import build_lock

    return build_lock(folder)


def test_jit_background_starts_its_build_once_the_eager_calls_took_long_enough(tmp_path, monkeypatch):
    # The budget is PAYOFF x the recorded build time: 1000 s holds the build; 1 us starts
    # it at the second call (the first call's eager time is already over 1.5 us).
    step, state, train, _ = problem()
    batch = next(iter(lf.data.iterate(train, 0)))
    for seconds, started in ((1000.0, False), (1e-6, True)):
        monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / str(seconds)))
        (tmp_path / str(seconds) / "aot").mkdir(parents=True)
        (tmp_path / str(seconds) / "aot" / ".build-seconds.json").write_text(json.dumps({"fn": seconds}))
        monkeypatch.setattr(Jitted, "store", lambda self, *a, **k: time.sleep(0.01))
        fast = lf.jit(step, background=True)
        s = lf.tree.map(torch.clone, state)
        with warnings.catch_warnings():  # (the no-op build, if already reported, "failed" to load)
            warnings.simplefilter("ignore")
            for _ in range(3):
                s, _ = fast(s, batch)
        assert (fast.background.builder.started is not None) == started, seconds
        assert fast.switched_at is None
        fast.background.builder.close()


@pytest.mark.compile
def test_jit_background_calls_eagerly_until_built_then_compiled(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LIGHTFN_BACKGROUND_WAIT", "1")  # the build starts at the first call
    step, state, train, _ = problem()
    batches = list(lf.data.iterate(train, 0))
    eager_state = lf.tree.map(torch.clone, state)
    fast = lf.jit(step, donate=True, background=True)
    bg_state = lf.tree.map(torch.clone, state)
    bg_state, _ = fast(bg_state, batches[0])
    eager_state, _ = step(eager_state, batches[0])
    assert fast.switched_at is None
    assert_equal_trees(bg_state, eager_state)  # the first call ran eagerly
    fast.background.builder.poll(wait=True)  # (a test waits; a loop just keeps calling)
    for batch in batches[1:]:
        bg_state, _ = fast(bg_state, batch)
        eager_state, _ = step(eager_state, batch)
    assert fast.switched_at == 1  # the second call found the artifact ready
    for a, b in zip(lf.tree.leaves(bg_state), lf.tree.leaves(eager_state)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    _aot.reset_stats()
    again = lf.jit(step, donate=True, background=True)  # a later process would do the same
    again(lf.tree.map(torch.clone, state), batches[0])
    assert again.switched_at == 0 and _aot.stats()["loads"] == 1 and _aot.stats()["traces"] == 0
