"""A sharded checkpoint folder loads with lf.load in one plain process (lightfn.distributed.sharded_folder)."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import lightfn as lf
import lightfn.distributed as ld
from lightfn.checkpoint import load, save
from lightfn.distributed.fully_sharded import ShardedParams, cut_state
from lightfn.distributed.sharded_checkpoint import INDEX_NAME, index_contents
from lightfn.errors import CheckpointError
from lightfn.optim.alias import adam
from lightfn.fit._run import Position, Run, run_metadata, to_tree

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "dist_workers"
sys.path.insert(0, str(WORKERS))
from common import loss_fn, make_params  # noqa: E402


def _trained_state(steps: int = 3) -> lf.TrainState:
    opt = adam(1e-2)
    state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
    step = lf.train_step(loss_fn, opt)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        state, _ = step(state, (x, x[:, :3]))
    return state


def _fresh() -> lf.TrainState:
    return lf.TrainState.create(params=make_params(1), optimizer=adam(1e-2), seed=5)


def _write_folder(folder: pathlib.Path, state, world: int, metadata=None, wrap=lambda s: s) -> list[str]:
    """What save_sharded writes from ``world`` ranks, built in this process: rank r's part
    (cut_state, as shard_state gives on rank r) as an ordinary file, then the index.
    ``wrap`` turns a rank's sharded TrainState into the tree saved (e.g. fit's packed loop)."""
    names = [f"{'ab' * 8}-shard-{r:05d}-of-{world:05d}.safetensors" for r in range(world)]
    folder.mkdir(parents=True, exist_ok=True)
    for r, name in enumerate(names):
        save(folder / name, wrap(cut_state(state, r, world)), metadata=metadata)
    index = index_contents(wrap(cut_state(state, 0, world)), names, metadata)
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return names


def _assert_bitwise(got, want) -> None:
    got_leaves, want_leaves = lf.tree.leaves_with_path(got), lf.tree.leaves(want)
    assert lf.tree.structure(got) == lf.tree.structure(want)
    for (p, a), b in zip(got_leaves, want_leaves):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), lf.tree.keystr(p)
        else:
            assert a == b, lf.tree.keystr(p)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_load_reassembles_the_full_state_bitwise(tmp_path, world):
    state = _trained_state()
    _write_folder(tmp_path / "ck", state, world)
    index = json.loads((tmp_path / "ck" / INDEX_NAME).read_text())
    assert index["sharded"]["['params']"]["padding"] == {1: 0, 2: 1, 4: 1}[world]  # 159 elements
    assert len(index["sharded"]) == 3  # params, Adam's mu and nu

    restored = lf.load(tmp_path / "ck", like=_fresh())
    assert isinstance(restored, lf.TrainState) and not isinstance(restored.params, ShardedParams)
    _assert_bitwise(restored, state)
    # the same as unshard_state of the sharded state
    mesh = ld.single_process_mesh("cpu")
    _assert_bitwise(restored, ld.unshard_state(ld.shard_state(state, mesh), mesh))
    # separate tensors per leaf, not views of one flat buffer
    assert restored.params["enc"]["w"].untyped_storage().nbytes() == 8 * 13 * 4


@pytest.mark.parametrize("world", [2, 3])
def test_template_free_and_subtree_loads_match_an_ordinary_file(tmp_path, world):
    state = _trained_state()
    _write_folder(tmp_path / "ck", state, world, metadata={"note": "x"})
    save(tmp_path / "one.safetensors", state)
    _assert_bitwise(lf.load(tmp_path / "ck"), lf.load(tmp_path / "one.safetensors"))
    _assert_bitwise(lf.load(tmp_path / "ck", subtree="params"), state.params)
    _assert_bitwise(lf.load(tmp_path / "ck", subtree=("params", "enc")), state.params["enc"])
    _assert_bitwise(lf.load(tmp_path / "ck", subtree="params", like=make_params(2)), state.params)
    mu = lf.load(tmp_path / "ck", subtree=("opt_state", 0, "mu"))
    _assert_bitwise(mu, state.opt_state[0].mu)
    assert float(mu["dec"]["w"].abs().sum()) > 0  # trained moments, not zeros
    meta = lf.read_metadata(tmp_path / "ck")
    assert meta["metadata"] == {"note": "x"} and meta["format_version"] == 1


def test_a_folder_index_without_a_params_tree_still_loads(tmp_path):
    # indexes written before "tree" was stored: the params paths give nested dicts
    state = _trained_state()
    _write_folder(tmp_path / "ck", state, 2)
    index = json.loads((tmp_path / "ck" / INDEX_NAME).read_text())
    for desc in index["sharded"].values():
        del desc["tree"]
    (tmp_path / "ck" / INDEX_NAME).write_text(json.dumps(index))
    _assert_bitwise(lf.load(tmp_path / "ck", like=_fresh()), state)


def _fit_packed(sharded_state):
    run = Run(state=sharded_state, position=Position(epoch=1, batch=2, step=7, elapsed=3.0),
              acc={"mean": torch.tensor([1.5, 2.0]), "sum": {}}, metric_names=("loss",), data_seed="0")
    return to_tree(run)


def test_a_fit_folder_loads_into_a_train_state_and_consolidates(tmp_path):
    state = _trained_state()
    meta = run_metadata({"lr": 0.01, "layers": [8, 13]})
    _write_folder(tmp_path / "ck", state, 2, metadata=meta, wrap=_fit_packed)
    restored = lf.load(tmp_path / "ck", like=_fresh())  # fit's loop bookkeeping skipped
    _assert_bitwise(restored, state)
    whole = lf.load(tmp_path / "ck")
    assert whole["loop"]["step"] == 7 and torch.equal(whole["loop"]["acc"], torch.tensor([1.5, 2.0]))
    assert lf.read_metadata(tmp_path / "ck")["hparams"] == {"lr": 0.01, "layers": [8, 13]}

    out = ld.consolidate(tmp_path / "ck", tmp_path / "model.safetensors")
    assert out.is_file()
    _assert_bitwise(lf.load(out, like=_fresh()), state)
    assert lf.read_metadata(out)["hparams"] == {"lr": 0.01, "layers": [8, 13]}
    _assert_bitwise(lf.load(out), whole)


def test_missing_rank_file_names_it(tmp_path):
    names = _write_folder(tmp_path / "ck", _trained_state(), 2)
    (tmp_path / "ck" / names[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"{names[1]}: missing; index.json lists it as rank 1 of 2's file.*copy every"):
        lf.load(tmp_path / "ck")


def test_rank_file_of_another_world_size_is_refused(tmp_path):
    state = _trained_state()
    names = _write_folder(tmp_path / "ck", state, 2)
    other = _write_folder(tmp_path / "four", state, 4)
    shutil.copy(tmp_path / "four" / other[1], tmp_path / "ck" / names[1])  # a stray file under rank 1's name
    with pytest.raises(CheckpointError, match=r"shard-00001-of-00002.safetensors: its slice of state\['params'\] is float32 of "
                       r"shape \(40,\), but index.json \(world size 2\) expects float32 of shape \(80,\)"):
        lf.load(tmp_path / "ck", like=_fresh())
    # an index naming files of another world size
    index = json.loads((tmp_path / "four" / INDEX_NAME).read_text())
    index["world_size"], index["files"] = 2, other[:2]
    (tmp_path / "four" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index.json says world size 2, but this file is named for another number of ranks"):
        lf.load(tmp_path / "four")
    index["world_size"] = 3
    (tmp_path / "four" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="file list does not match its world size"):
        lf.load(tmp_path / "four")


def test_sharded_template_and_template_mismatch_are_refused(tmp_path):
    state = _trained_state()
    _write_folder(tmp_path / "ck", state, 2)
    sharded_like = ld.shard_state(_fresh(), ld.single_process_mesh("cpu"))
    with pytest.raises(CheckpointError, match=r"holds ShardedParams.*load_sharded\(folder, like, mesh\)"):
        lf.load(tmp_path / "ck", like=sharded_like)
    other = make_params()
    other["enc"]["w"] = torch.zeros(8, 14)
    with pytest.raises(CheckpointError, match=r"\['params'\]\['enc'\]\['w'\]: expected tensor\(8, 14\) float32, found tensor\(8, 13\) float32"):
        lf.load(tmp_path / "ck", like=lf.TrainState.create(params=other, optimizer=adam(1e-2)))


def _run_cli(*args: object) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "lightfn.checkpoint", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_consolidate_command(tmp_path):
    state = _trained_state()
    _write_folder(tmp_path / "ck", state, 2, metadata=run_metadata({"lr": 0.01}), wrap=_fit_packed)
    proc = _run_cli("consolidate", tmp_path / "ck", tmp_path / "model.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no runpy double-import warning
    assert proc.stdout.strip() == str(tmp_path / "model.safetensors")
    _assert_bitwise(lf.load(tmp_path / "model.safetensors", like=_fresh()), state)
    assert lf.read_metadata(tmp_path / "model.safetensors")["hparams"] == {"lr": 0.01}
    bad = _run_cli("consolidate", tmp_path / "nothing", tmp_path / "x.safetensors")
    assert bad.returncode == 1 and "not a sharded checkpoint folder" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_a_folder_saved_by_2_torchrun_ranks_loads_in_this_process(tmp_path):
    from test_distributed import torchrun  # the launcher the distributed tests use

    proc = torchrun("ckpt.py", "save", tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fresh = lf.TrainState.create(params=make_params(), optimizer=adam(1e-2), seed=0)
    reference = load(tmp_path / "reference.safetensors", like=fresh)  # unshard_state, saved by rank 0
    _assert_bitwise(lf.load(tmp_path / "sharded", like=fresh), reference)
    _assert_bitwise(lf.load(tmp_path / "sharded", subtree="params"), reference.params)
    assert lf.read_metadata(tmp_path / "sharded")["metadata"] == {"note": "test"}
