"""The ahead-of-time artifact cache (lightfn/_compile/aot.py): load without tracing, keys, corruption, parity.

Each AOT build costs tens of seconds on a small CPU, so one module-scoped fixture builds the
MLP step's artifact once and the tests share it; counts come from ``lightfn._compile.aot.stats()``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import lightfn as lf
from lightfn._compile import aot as _aot, store as _aot_store

pytestmark = pytest.mark.compile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_problem(lr: float = 1e-2, features: int = 16):
    """A small MLP autoencoder, its Adam train step, a fresh state and three batches."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.Tanh(), torch.nn.Linear(8, features))
    apply, params = lf.functionalize(net)

    def loss_fn(p, batch):
        return ((apply(p, batch) - batch) ** 2).mean()

    opt = lf.optim.adam(lr)
    state = lf.TrainState.create(params=params, optimizer=opt, seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, features, generator=g) for _ in range(3)]
    return lf.train_step(loss_fn, opt), state, batches


def run_steps(step, state, batches):
    """Train on ``batches`` from a copy of ``state``; returns (state, metrics of each step)."""
    state = lf.tree.map(torch.clone, state)
    history = []
    for b in batches:
        state, metrics = step(state, b)
        history.append(metrics)
    return state, history


def _flat(state):
    return [x.clone() for x in lf.tree.leaves(state)]


def _main_in_subprocess() -> None:
    """Run in a fresh process (test_second_process_loads_without_tracing): print counts and results."""
    step, state, batches = make_problem()
    out, history = run_steps(lf.jit(step, donate=True, cache=True), state, batches)
    import sys

    print(json.dumps({"stats": _aot.stats(), "leaves": [x.tolist() for x in lf.tree.leaves(out)],
                      "loss": [m["loss"].item() for m in history], "dynamo": "torch._dynamo" in sys.modules,
                      "inductor": "torch._inductor" in sys.modules}))


@pytest.fixture(scope="module")
def aot_cache(tmp_path_factory):
    """A cache folder holding the MLP step's artifact, and the results of running it."""
    folder = tmp_path_factory.mktemp("lightfn-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTFN_CACHE_DIR", str(folder))
        _aot.reset_stats()
        step, state, batches = make_problem()
        out, history = run_steps(lf.jit(step, donate=True, cache=True), state, batches)
        built = _aot.stats()
        yield {"folder": folder, "built": built, "state": out, "history": history}


def test_first_call_builds_one_artifact(aot_cache):
    assert aot_cache["built"] == {"traces": 1, "builds": 1, "loads": 0, "rebuilds": 0, "fallbacks": 0}
    files = sorted(p.suffix for p in (aot_cache["folder"] / "aot").iterdir())
    assert files == [".json", ".lock", ".pt2"]  # manifest, the build lock, package


@pytest.mark.slow
def test_second_process_loads_without_tracing(aot_cache):
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('aot_test_module', {str(pathlib.Path(__file__))!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "m._main_in_subprocess()\n"
    )
    env = {**os.environ, "LIGHTFN_CACHE_DIR": str(aot_cache["folder"]), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stats"] == {"traces": 0, "builds": 0, "loads": 1, "rebuilds": 0, "fallbacks": 0}
    # what makes a warm start fast: neither dynamo nor inductor's Python side is imported (~1.5 s)
    assert not result["dynamo"] and not result["inductor"]
    here = [x.tolist() for x in lf.tree.leaves(aot_cache["state"])]
    assert result["leaves"] == here  # bit for bit: the same artifact, the same numbers
    assert result["loss"] == [m["loss"].item() for m in aot_cache["history"]]


def test_cached_step_matches_jit_bitwise(aot_cache):
    step, state, batches = make_problem()
    ref, ref_history = run_steps(lf.jit(step, donate=True), state, batches)
    for a, b in zip(lf.tree.leaves(ref), lf.tree.leaves(aot_cache["state"])):
        assert torch.equal(a, b)
    for m, n in zip(ref_history, aot_cache["history"]):
        assert torch.equal(m["loss"], n["loss"])
    assert int(aot_cache["state"].step) == 3


def test_donation_writes_into_the_input_state(aot_cache, monkeypatch):
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(aot_cache["folder"]))
    _aot.reset_stats()
    step, state, batches = make_problem()
    state = lf.tree.map(torch.clone, state)
    ptrs = [x.data_ptr() for x in lf.tree.leaves(state)]
    before = _flat(state)
    new, _ = lf.jit(step, donate=True, cache=True)(state, batches[0])
    assert _aot.stats()["loads"] == 1 and _aot.stats()["traces"] == 0
    assert [x.data_ptr() for x in lf.tree.leaves(new)] == ptrs
    assert not torch.equal(lf.tree.leaves(state)[1], before[1])  # the input's params were updated in place


def test_a_new_batch_size_reuses_the_artifact(aot_cache, monkeypatch):
    # One load serves both batch sizes. After its first call a shape is found in one
    # flatten (flat.call_key), not by a new Inputs and signature: each batch size is an
    # entry of its own for the same loaded artifact.
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(aot_cache["folder"]))
    _aot.reset_stats()
    step, state, batches = make_problem()
    jitted = lf.jit(step, donate=True, cache=True)
    state = lf.tree.map(torch.clone, state)
    sequence = [batches[0], batches[1][:5], batches[2][:5], batches[2]]  # 8, 5, 5 again, 8 again
    history = []
    for b in sequence:
        state, m = jitted(state, b)
        history.append(m["loss"])
    assert _aot.stats() == {"traces": 0, "builds": 0, "loads": 1, "rebuilds": 0, "fallbacks": 0}
    assert len(jitted._calls) == 2  # batch 8, batch 5
    assert len({id(cached) for cached, _, _ in jitted._calls.values()}) == 1
    _, eager = run_steps(step, make_problem()[1], sequence)
    for got, want in zip(history, eager):
        torch.testing.assert_close(got, want["loss"])


def test_the_exact_call_key_sees_layout_dtype_grad_and_structure():
    from lightfn._compile.flat import call_key

    x = torch.zeros(4, 3)
    base = call_key(({"a": x}, 2), {})[0]
    assert call_key(({"a": torch.ones(4, 3)}, 2), {})[0] == base  # values never matter
    assert call_key(({"a": torch.zeros(3, 4).t()}, 2), {})[0] != base  # non-contiguous
    assert call_key(({"a": x.double()}, 2), {})[0] != base
    assert call_key(({"a": x.clone().requires_grad_()}, 2), {})[0] != base
    assert call_key(({"a": x}, 3), {})[0] != base  # a constant
    assert call_key(({"b": x}, 2), {})[0] != base  # the structure
    assert call_key(({"a": torch.nn.Parameter(x)}, 2), {})[0] != base  # the tensor type
    with torch.no_grad():
        assert call_key(({"a": x}, 2), {})[0] != base


def test_the_key_covers_all_of_lightfns_source():
    # An edit anywhere in lightfn (optimizer math, the step, fit) may change a graph, so
    # every lightfn file is part of the key, not only the compile package's.
    from lightfn._compile.key import lightfn_sources

    root, files = lightfn_sources()
    assert root == pathlib.Path(lf.__file__).resolve().parent
    names = {str(f.relative_to(root)) for f in files}
    assert {"step.py", "optim/adaptive.py", "fit/_accumulate.py", "_compile/aot.py"} <= names


def test_changed_loss_shape_or_constant_is_a_new_key():
    step, state, batches = make_problem()
    key = _aot.artifact_key(step, (state, batches[0]), dynamic_argnums=(1,))
    # the same step rebuilt from scratch: the same key
    step2, state2, batches2 = make_problem()
    assert _aot.artifact_key(step2, (state2, batches2[0]), dynamic_argnums=(1,)) == key
    # another batch size: the batch dim is dynamic, so the same key
    assert _aot.artifact_key(step, (state, batches[0][:5]), dynamic_argnums=(1,)) == key
    # a changed loss function
    other = step.replace(loss_fn=lambda p, batch: ((batch - 0.5) ** 2).mean() + sum(v.sum() for v in p.values()) * 0)
    assert _aot.artifact_key(other, (state, batches[0]), dynamic_argnums=(1,)) != key
    # a changed closure constant (the learning rate inside the optimizer)
    lr_step, lr_state, _ = make_problem(lr=1e-3)
    assert _aot.artifact_key(lr_step, (lr_state, batches[0]), dynamic_argnums=(1,)) != key
    # a changed input shape (features), and a static batch dim
    wide_step, wide_state, wide_batches = make_problem(features=12)
    assert _aot.artifact_key(wide_step, (wide_state, wide_batches[0]), dynamic_argnums=(1,)) != key
    assert _aot.artifact_key(step, (state, batches[0]), dynamic_argnums=()) != key
    # a changed value the loss reads from a closed-over tensor
    w = torch.ones(16)
    a = lambda p, batch: (w * batch).mean()  # noqa: E731
    k1 = _aot.artifact_key(step.replace(loss_fn=a), (state, batches[0]))
    w[0] = 2.0
    assert _aot.artifact_key(step.replace(loss_fn=a), (state, batches[0])) != k1


def test_corrupted_artifact_is_rebuilt_with_a_warning(aot_cache, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    shutil.copytree(aot_cache["folder"], folder)
    (package,) = (folder / "aot").glob("*.pt2")
    package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])  # truncated
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(folder))
    _aot.reset_stats()
    step, state, batches = make_problem()
    with pytest.warns(UserWarning, match="corrupted") as record:
        out, _ = run_steps(lf.jit(step, donate=True, cache=True), state, batches)
    assert len([w for w in record if "corrupted" in str(w.message)]) == 1
    assert "\n" not in str(record[0].message)
    assert _aot.stats() == {"traces": 1, "builds": 1, "loads": 0, "rebuilds": 1, "fallbacks": 0}
    for a, b in zip(lf.tree.leaves(out), lf.tree.leaves(aot_cache["state"])):
        assert torch.equal(a, b)
    # the rebuilt artifact loads cleanly; a torn manifest is a rebuild too, never a load
    _aot.reset_stats()
    run_steps(lf.jit(step, donate=True, cache=True), state, batches[:1])
    assert _aot.stats()["loads"] == 1
    (manifest,) = (folder / "aot").glob("*.json")
    manifest.write_text(manifest.read_text()[:20])
    with pytest.warns(UserWarning, match="corrupted"):
        assert _aot._existing(folder / "aot", manifest.stem) is None


def test_unfingerprintable_step_falls_back_to_torch_compile(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path))
    _aot.reset_stats()
    lock = threading.Lock()
    verbose = False

    def f(x):
        if verbose:
            with lock:
                print("step")
        return x * 2 + 1

    jitted = lf.jit(f, cache=True)
    with pytest.warns(UserWarning, match=r"not in the AOT cache \(cannot fingerprint the step: it reaches a _thread.lock"):
        y = jitted(torch.ones(4))
    assert torch.equal(y, torch.full((4,), 3.0))
    assert _aot.stats()["fallbacks"] == 1 and _aot.stats()["traces"] == 0
    assert torch.equal(jitted(torch.zeros(4)), torch.ones(4))  # compiled by torch.compile, said once
    assert _aot.stats()["fallbacks"] == 1
    assert not (tmp_path / "aot").exists()


def test_data_dependent_step_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path))
    _aot.reset_stats()

    def f(x):
        return x * 2 if x.sum() > 0 else x - 1

    with pytest.raises(_aot.Unsupported):
        _aot.compile_cached(f, (torch.ones(4),))
    jitted = lf.jit(f, cache=True)
    with pytest.warns(UserWarning, match="not in the AOT cache"), pytest.raises(lf.errors.CompileError):
        jitted(torch.ones(4))  # torch.compile's fullgraph refuses it too, with its usual message
    assert _aot.stats()["fallbacks"] == 1


def test_inputs_that_require_grad_are_not_cached():
    with pytest.raises(_aot.Unsupported, match="requires grad"):
        _aot.artifact_key(lambda x: x * 2, (torch.ones(3, requires_grad=True),))


def test_cache_is_off_by_default(monkeypatch):
    monkeypatch.delenv("LIGHTFN_AOT", raising=False)
    assert not lf.jit(lambda x: x).cache
    monkeypatch.setenv("LIGHTFN_AOT", "1")
    assert lf.jit(lambda x: x).cache
    assert not lf.jit(lambda x: x, cache=False).cache
    assert not lf.jit(lambda x: x, disable=True).cache


def test_cache_folder_is_bounded(tmp_path, monkeypatch):
    folder = tmp_path / "aot"
    folder.mkdir()
    for i, key in enumerate(("a" * 40, "b" * 40, "c" * 40)):
        (folder / f"{key}-0.pt2").write_bytes(b"x" * 2**20)
        (folder / f"{key}.json").write_text("{}")
        os.utime(folder / f"{key}.json", (1000 + i, 1000 + i))
    monkeypatch.setenv("LIGHTFN_AOT_CACHE_MB", "2.5")
    _aot_store.evict(folder, keep="a" * 40)
    assert sorted(p.name[:1] for p in folder.glob("*.json")) == ["a", "c"]  # b: least recently used


def test_fit_with_the_cache_trains_bitwise_like_fit_without(monkeypatch, tmp_path):
    from lightfn.fit import _accumulate

    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path))
    step, state, batches = make_problem()
    data = lf.data.ArrayLoader((torch.cat(batches),), batch_size=8, shuffle=False)
    loss_fn = step.loss_fn

    def run():
        fresh = lf.tree.map(torch.clone, state)
        log = []

        class Log(lf.callbacks.Callback):
            def on_validation_end(self, ctx):
                log.append(ctx.metrics["val/loss"])

        out = lf.fit(lf.train_step(lambda p, b: loss_fn(p, b[0]), step.optimizer), fresh, data,
                     val_data=data, eval_step=lf.eval_step(lambda p, b: loss_fn(p, b[0])),
                     max_epochs=2, jit="sync", progress=False, num_sanity_val_steps=0, callbacks=[Log()])
        return out, log

    results = {}
    for aot in ("0", "1"):
        monkeypatch.setenv("LIGHTFN_AOT", aot)
        _aot.reset_stats()
        results[aot] = run()
        counts = _aot.stats()
    assert counts["builds"] == 2 and counts["fallbacks"] == 0  # fit's train and eval graphs
    assert int(results["1"][0].step) == 6
    # A later run loads both graphs and the metric layouts remembered beside them: no
    # abstract trace (the first use of FakeTensorMode imports torch._dynamo, ~1 s).
    _aot.reset_stats()
    monkeypatch.setattr(_accumulate, "abstract_eval", lambda *a: pytest.fail("traced a remembered step"))
    results["again"] = run()
    assert _aot.stats()["builds"] == 0 and _aot.stats()["traces"] == 0
    for other in ("1", "again"):
        for a, b in zip(lf.tree.leaves(results["0"][0]), lf.tree.leaves(results[other][0])):
            assert torch.equal(a, b)
        assert results[other][1] == results["0"][1]


def test_a_branch_on_the_batch_size_builds_per_size(monkeypatch, tmp_path):
    # make_fx keeps one branch: the graph must not be reused for a size taking the other.
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path))
    _aot.reset_stats()

    def f(x):
        return x * 2 if x.shape[0] > 4 else x - 1

    jitted = lf.jit(f, cache=True)
    x = torch.arange(16.0).reshape(8, 2)
    assert torch.equal(jitted(x), x * 2)
    assert torch.equal(jitted(x[:3]), x[:3] - 1)
    assert torch.equal(jitted(x[:6]), x[:6] * 2)
    assert _aot.stats()["builds"] == 3 and _aot.stats()["fallbacks"] == 0
