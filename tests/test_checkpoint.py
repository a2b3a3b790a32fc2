"""Checkpoints: safetensors pytrees, round trips, partial loads, atomicity, refusal of bad files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lightfn as lf
from lightfn.checkpoint import CheckpointError, load, read_metadata, save


class AdamState(NamedTuple):
    mu: Any
    nu: Any


@lf.tree.pytree_dataclass
class State:
    params: Any
    opt_state: Any
    step: torch.Tensor
    rng: torch.Tensor
    epoch: int
    lr_scale: float
    note: str
    done: bool
    extra: Any = None


def make_state(seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    params = {
        "enc.0.weight": torch.randn(4, 3, generator=g),
        "enc.0.bias": torch.randn(4, generator=g),
        "head": {"weight": torch.randn(3, 4, generator=g).t(), "scale": torch.tensor(2.5)},  # t(): non-contiguous
    }
    return State(
        params=params,
        opt_state=(
            AdamState(mu=lf.tree.map(torch.zeros_like, params), nu=lf.tree.map(torch.ones_like, params)),
            [torch.tensor(7, dtype=torch.int64), None],
        ),
        step=torch.tensor(123456789012, dtype=torch.int64),
        rng=torch.randint(0, 256, (16,), dtype=torch.uint8, generator=g),
        epoch=3,
        lr_scale=float("inf"),
        note="résumé: ok",
        done=False,
        extra={
            "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
            "fp16": torch.randn(2, 2, generator=g).to(torch.float16),
            "mask": torch.tensor([True, False, True]),
            "empty": torch.empty(0, 3),
            "strided": torch.arange(20.0).reshape(4, 5)[:, ::2],
            "ints": [1, -2, 10**15],
            "floats": (0.1, -0.0, float("nan")),
            0: "int key",
        },
    )


def assert_same(a: Any, b: Any) -> None:
    """Equal structure, and every leaf equal: tensors bit for bit with dtype, shape, device."""
    assert lf.tree.structure(a) == lf.tree.structure(b)
    for (pa, x), (pb, y) in zip(lf.tree.leaves_with_path(a), lf.tree.leaves_with_path(b), strict=True):
        assert pa == pb
        assert type(x) is type(y), pa
        if isinstance(x, torch.Tensor):
            assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device), pa
            assert torch.equal(x, y), pa
        elif isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), pa
        else:
            assert x == y, pa


def header_of(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


# ----------------------------------------------------------------------------- round trips


def test_round_trip_every_leaf_kind_with_template(tmp_path: Path) -> None:
    state = make_state()
    p = save(tmp_path / "s.safetensors", state, metadata={"lr": 3e-4, "layers": [64, 3]})
    assert p == tmp_path / "s.safetensors"
    out = load(p, like=make_state(seed=1))
    assert isinstance(out, State) and isinstance(out.opt_state[0], AdamState)
    assert_same(out, state)
    assert out.step.item() == 123456789012 and out.extra["floats"][1] == 0.0 and math.copysign(1, out.extra["floats"][1]) < 0
    meta = read_metadata(p)
    assert meta["metadata"] == {"lr": 3e-4, "layers": [64, 3]}
    assert meta["format_version"] == 1 and meta["torch_version"] == torch.__version__
    assert isinstance(meta["lightfn_version"], str)


def test_load_without_template_gives_dicts_lists_tuples(tmp_path: Path) -> None:
    state = make_state()
    p = save(tmp_path / "s.safetensors", state)
    out = load(p)
    assert set(out) == {"params", "opt_state", "step", "rng", "epoch", "lr_scale", "note", "done", "extra"}
    assert_same(out["params"], state.params)
    opt = out["opt_state"]
    assert isinstance(opt, tuple) and isinstance(opt[1], list) and opt[1][1] is None
    assert set(opt[0]) == {"mu", "nu"}  # a NamedTuple comes back as a dict of its fields
    assert_same(opt[0]["nu"], state.opt_state[0].nu)
    assert out["extra"][0] == "int key" and out["extra"]["floats"][0] == 0.1 and math.isnan(out["extra"]["floats"][2])
    assert out["step"].dtype == torch.int64 and out["step"].shape == () and out["epoch"] == 3
    assert out["note"] == "résumé: ok" and out["done"] is False and out["lr_scale"] == math.inf
    assert out["extra"]["empty"].shape == (0, 3) and out["extra"]["bf16"].dtype == torch.bfloat16
    assert torch.equal(out["extra"]["strided"], torch.arange(20.0).reshape(4, 5)[:, ::2])


def test_tied_tensors_are_stored_once_and_come_back_tied(tmp_path: Path) -> None:
    w = torch.randn(6, 4)
    tree = {"embed": w, "head": {"weight": w}, "other": torch.randn(2)}
    p = save(tmp_path / "t.safetensors", tree)
    with safe_open(str(p), "pt") as f:
        assert len(list(f.keys())) == 2
    out = load(p)
    assert out["embed"] is out["head"]["weight"] and torch.equal(out["embed"], w)
    out = load(p, like={"embed": torch.zeros(6, 4), "head": {"weight": torch.zeros(6, 4)}, "other": torch.zeros(2)})
    assert out["embed"] is out["head"]["weight"]
    assert torch.equal(load(p, subtree=("head", "weight")), w)  # the stored copy lives under "embed"


def test_views_of_one_storage_are_saved_independently(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    tree = {"all": base, "middle": base[2:5], "stride": base[::3]}
    out = load(save(tmp_path / "v.safetensors", tree))
    for k in tree:
        assert torch.equal(out[k], tree[k])
    out["all"][3] = -1.0
    assert out["middle"][1] == 3.0  # stored separately, so not aliased after loading


def test_tree_of_only_scalars_and_a_bare_tensor(tmp_path: Path) -> None:
    assert load(save(tmp_path / "a.safetensors", {"a": 1, "b": [None, "x"]})) == {"a": 1, "b": [None, "x"]}
    t = torch.tensor([1, 2], dtype=torch.int32)
    assert torch.equal(load(save(tmp_path / "b.safetensors", t)), t)


def test_key_layout_is_readable_with_plain_safetensors(tmp_path: Path) -> None:
    state = make_state()
    p = save(tmp_path / "s.safetensors", state)
    with safe_open(str(p), "pt") as f:
        keys = {tuple(json.loads(k)): k for k in f.keys()}
        params = {path[1:]: f.get_tensor(k) for path, k in keys.items() if path[0] == "params"}
        assert f.metadata()["lightfn.format_version"] == "1"
        assert ("opt_state", 0, "mu", "enc.0.weight") in keys  # NamedTuple fields are named
    assert set(params) == {("enc.0.weight",), ("enc.0.bias",), ("head", "weight"), ("head", "scale")}
    assert torch.equal(params[("head", "weight")], state.params["head"]["weight"])
    everything = load_file(str(p))  # the reference reader takes the whole file too
    assert torch.equal(everything['["extra","bf16"]'], state.extra["bf16"])
    assert torch.equal(everything['["opt_state",1,0]'], torch.tensor(7))


def test_every_safetensors_dtype_round_trips(tmp_path: Path) -> None:
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
              torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
              torch.float8_e5m2, torch.complex64]  # fmt: skip
    tree = {str(d): torch.arange(6.0).reshape(2, 3).to(d) for d in dtypes}
    out = load(save(tmp_path / "d.safetensors", tree), like=tree)
    for k, t in tree.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k].view(torch.uint8), t.view(torch.uint8)), k


def test_partial_load_reads_only_the_subtree(tmp_path: Path) -> None:
    state = make_state()
    p = save(tmp_path / "s.safetensors", state)
    # Damage a tensor outside params: a full load sees it, a params-only load never reads it.
    header = header_of(p)
    begin, end = header['["rng"]']["data_offsets"]
    raw = bytearray(p.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little") + begin] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checksum.*\['rng'\]"):
        load(p)
    assert_same(load(p, subtree="params"), state.params)
    assert_same(load(p, subtree=("params",), like=state.params), state.params)
    assert torch.equal(load(p, subtree=("params", "head", "scale")), torch.tensor(2.5))
    assert_same(load(p, subtree=("opt_state", 0, "nu")), state.opt_state[0].nu)
    with pytest.raises(CheckpointError, match="no subtree.*has keys.*'params'"):
        load(p, subtree="parms")


def test_device_argument_and_meta_templates(tmp_path: Path) -> None:
    state = make_state()
    p = save(tmp_path / "s.safetensors", state)
    assert all(t.device.type == "meta" for t in lf.tree.leaves(load(p, device="meta", subtree="params")))
    template = lf.tree.map(lambda t: torch.empty_like(t, device="meta"), state.params)
    out = load(p, like=template, subtree="params")  # meta leaves: real tensors on `device` (CPU)
    assert_same(out, state.params)


def test_template_mismatch_lists_every_differing_path(tmp_path: Path) -> None:
    state = make_state()
    p = save(tmp_path / "s.safetensors", state)
    params = dict(state.params)
    del params["enc.0.bias"]  # extra in the file
    params["new"] = torch.zeros(2)  # missing from the file
    params["enc.0.weight"] = torch.zeros(3, 4)  # other shape
    params["head"] = {"weight": torch.zeros(4, 3, dtype=torch.float64), "scale": 2.5}  # other dtype, scalar vs tensor
    with pytest.raises(CheckpointError) as err:
        load(p, like=state.replace(params=params, epoch=3.0))
    msg = str(err.value)
    assert "6 difference(s)" in msg
    for needle in (
        "['params']['enc.0.bias']: in the file (tensor(4,) float32) but not in the template",
        "['params']['new']: missing from the file (expected tensor(2,) float32)",
        "['params']['enc.0.weight']: expected tensor(3, 4) float32, found tensor(4, 3) float32",
        "['params']['head']['weight']: expected tensor(4, 3) float64, found tensor(4, 3) float32",
        "['params']['head']['scale']: expected float 2.5, found tensor() float32",
        "['epoch']: expected float 3.0, found int 3",
    ):
        assert needle in msg, (needle, msg)
    assert str(p) in msg


def test_save_refuses_what_it_cannot_store_and_writes_nothing(tmp_path: Path) -> None:
    cases = [
        ({"a": object()}, None, r"\['a'\] of type object"),
        ({("x", 1): torch.zeros(1)}, None, "neither a str nor an int"),
        ({"s": torch.zeros(3, 3).to_sparse()}, None, "dense"),
        ({"m": torch.zeros(2, device="meta")}, None, "dense"),
        ({"c": torch.zeros(2, dtype=torch.complex128)}, None, "complex128"),
        ({"a": torch.zeros(1)}, {"bad": {1, 2}}, "JSON-serializable"),
    ]
    for tree, metadata, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern):
            save(tmp_path / "x.safetensors", tree, metadata=metadata)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- fit checkpoints


def _tiny_fit(tmp_path: Path, opt: Any, **kw: Any) -> tuple[Any, Any, Any, Any]:
    """A few eager fit steps of a linear regression that write last.safetensors: (step, fresh state, trained, batch)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5])

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        xb, yb = batch
        return ((xb @ p["w"] + p["b"] - yb) ** 2).mean()

    step = lf.train_step(loss_fn, opt)
    fresh = lf.TrainState.create(params={"w": torch.zeros(3), "b": torch.zeros(())}, optimizer=opt)
    ckpt = lf.callbacks.ModelCheckpoint(tmp_path, monitor="train/loss_epoch")
    trained = lf.fit(step, fresh, lf.data.ArrayLoader((x, y), batch_size=8), max_epochs=2, jit=False, progress=False,
                     callbacks=[ckpt], **kw)
    return step, fresh, trained, (x[:8], y[:8])


def test_fit_checkpoint_loads_into_a_train_state(tmp_path: Path) -> None:
    opt = lf.optim.chain(lf.optim.clip_by_global_norm(1.0), lf.optim.adamw(0.05))
    step, fresh, trained, batch = _tiny_fit(tmp_path, opt)
    out = load(tmp_path / "last.safetensors", like=fresh)  # the loop/callback bookkeeping is skipped
    assert isinstance(out, lf.TrainState) and type(out.opt_state[1]) is type(fresh.opt_state[1])
    assert_same(out, trained)
    assert int(out.step) == 6
    # without a template, the params are a plain dict, the same bits (inference)
    assert_same(load(tmp_path / "last.safetensors")["params"], trained.params)
    # the loaded state trains on exactly like the one fit returned
    assert_same(step(out, batch), step(trained, batch))
    # the best top-k file too (same run, monitored by the epoch loss: the last epoch is best)
    (best,) = tmp_path.glob("epoch=*.safetensors")
    assert_same(load(best, like=fresh).params, trained.params)
    # a template with the bookkeeping keys still gets them, and resume reads them as before
    assert load(tmp_path / "last.safetensors", subtree="loop")["step"] == 6


def test_only_fit_checkpoints_skip_their_bookkeeping(tmp_path: Path) -> None:
    state = {"w": torch.ones(2), "loop": {"n": torch.zeros(())}}
    p = save(tmp_path / "mine.safetensors", state)  # not written by fit: "loop" is the user's own
    with pytest.raises(CheckpointError, match=r"\['loop'\]\['n'\]: in the file"):
        load(p, like={"w": torch.zeros(2)})
    old = save(tmp_path / "fit.safetensors", state, metadata={"written_by": "lightfn.fit"})  # as fit wrote it before hparams
    assert torch.equal(load(old, like={"w": torch.zeros(2)})["w"], torch.ones(2))
    assert read_metadata(old)["hparams"] is None


@pytest.mark.parametrize("opt", [
    lf.optim.chain(lf.optim.clip_by_global_norm(1.0), lf.optim.adamw(0.05)),
    lf.optim.sgd(0.05, momentum=0.9),
    lf.optim.inject_hyperparams(lf.optim.adam)(lr=0.01),
    lf.optim.multi_steps(lf.optim.rmsprop(0.01), 2),
], ids=["adamw-clipped", "sgd-momentum", "injected-adam", "multi-steps-rmsprop"])
def test_a_state_loaded_without_a_template_steps_like_the_original(tmp_path: Path, opt: Any) -> None:
    step, _, trained, batch = _tiny_fit(tmp_path, opt)
    raw = load(tmp_path / "last.safetensors")  # nested dicts: NamedTuple optimizer states are dicts of fields
    state = lf.TrainState(**{k: v for k, v in raw.items() if k not in ("loop", "callbacks")})
    new, metrics = step(state, batch)  # the optimizer takes its state's dict form
    expected, expected_metrics = step(trained, batch)
    assert_same(new, expected)  # the same numbers, and the optimizer state is of its real types again
    assert_same(metrics, expected_metrics)
    with pytest.raises(lf.StepError, match=r"like=state"):
        step(raw, batch)  # the dict itself is refused, saying how to load a TrainState


def test_a_template_free_16_mixed_state_skips_an_inf_step_like_the_original(tmp_path: Path) -> None:
    # a skipped fp16 step keeps the state it got: it must be blended with the new one in one structure
    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        return ((batch @ p["w"]) ** 2).mean()

    step = lf.train_step(loss_fn, lf.optim.multi_steps(lf.optim.adam(0.1), 2), precision="16-mixed")
    state = step.prepare_state(lf.TrainState.create(params={"w": torch.ones(2)}, optimizer=step.optimizer))
    small = torch.full((4, 2), 0.01)
    state, _ = step(state, small)
    raw = load(save(tmp_path / "s.safetensors", state))
    loaded = lf.TrainState(**raw)
    loaded = loaded.replace(loss_scale=state.loss_scale)  # a pytree dataclass inside comes back as a dict too
    for batch in (torch.full((4, 2), float("inf")), small, small):  # skipped, then taken (an update every 2)
        state, _ = step(state, batch)
        loaded, _ = step(loaded, batch)
        assert_same(loaded, state)
    assert float(state.loss_scale.scale) == 2.0**14  # 2**16 overflows fp16, then the inf step: two halvings
    assert int(state.opt_state.gradient_step) == 1 and not torch.equal(state.params["w"], torch.ones(2))


def test_a_dict_of_other_fields_is_still_a_different_optimizers_state() -> None:
    opt = lf.optim.adam(0.1)
    params = {"w": torch.zeros(2)}
    state = opt.init(params)
    with pytest.raises(lf.optim.StateMismatchError, match="made by a different optimizer"):
        opt.update(params, ({"count": state[0].count, "mu": state[0].mu}, state[1]), params)  # no "nu"


# ----------------------------------------------------------------------------- bad input


def _valid_file(tmp_path: Path) -> Path:
    return save(tmp_path / "good.safetensors", {"params": {"w": torch.randn(8, 8), "b": torch.zeros(8)}, "step": 4})


def test_pickle_and_torch_save_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('x')".encode()
    # A protocol-2 pickle that would call exec(code): GLOBAL builtins.exec, BINUNICODE, TUPLE1, REDUCE, STOP.
    evil = b"\x80\x02cbuiltins\nexec\nX" + len(code).to_bytes(4, "little") + code + b"\x85R."
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(evil)
    ckpt = tmp_path / "lightning.safetensors"  # a torch.save / Lightning .ckpt zip, renamed
    with zipfile.ZipFile(ckpt, "w") as z:
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/version", "3\n")
    for p in (raw, ckpt):
        for fn in (load, read_metadata):
            with pytest.raises(CheckpointError, match="pickle/torch.save.*never unpickles.*weights_only") as err:
                fn(p)
            assert str(p) in str(err.value)
    assert not marker.exists()


def test_empty_random_and_truncated_files(tmp_path: Path) -> None:
    good = _valid_file(tmp_path)
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cases = {
        "empty": (b"", "empty"),
        "short": (b"\x01\x02\x03", "too short"),
        "random": (bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).tolist()), "claims|not a safetensors"),
        "cut_in_header": (data[: 8 + n // 2], "claims"),
        "cut_in_data": (data[:-5], "truncated"),
        "extra_bytes": (data + b"\0" * 16, "unexplained bytes"),
        "not_json": ((9).to_bytes(8, "little") + b"{nope!!!}", "not valid JSON"),
        "json_list": ((2).to_bytes(8, "little") + b"[]", "not a safetensors file"),
    }
    for name, (content, pattern) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match=pattern) as err:
            load(p)
        assert str(p) in str(err.value), name
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "missing.safetensors")


def test_absurd_sizes_are_refused_before_allocating(tmp_path: Path) -> None:
    p = tmp_path / "huge_header.safetensors"
    p.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="claims 4611686018427387904 bytes but only 2 follow"):
        load(p)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 2**82]}}).encode()
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="need 4835703278458516698824704 data bytes but the file holds 16"):
        load(p)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 16]}}).encode()
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="needs 4398046511104 bytes but data_offsets span 16"):
        load(p)


def test_flipped_byte_in_tensor_data_names_file_and_tensor(tmp_path: Path) -> None:
    p = _valid_file(tmp_path)
    begin, _ = header_of(p)['["params","w"]']["data_offsets"]
    raw = bytearray(p.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little") + begin + 17] ^= 0x04
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in tensor \['params'\]\['w'\]") as err:
        load(p)
    assert str(p) in str(err.value)
    assert load(p, verify=False)["params"]["w"].shape == (8, 8)  # verification can be switched off


def _rewrite_metadata(src: Path, dst: Path, **changes: str) -> None:
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta.update({k.replace("__", "."): v for k, v in changes.items()})
    save_file(tensors, str(dst), metadata=meta)


def test_bad_metadata_newer_format_and_damaged_header(tmp_path: Path) -> None:
    good = _valid_file(tmp_path)
    cases = {
        "bad_structure_json": ({"lightfn__structure": '{"kind": "dict", '}, "'lightfn.structure' is not valid JSON"),
        "bad_user_json": ({"lightfn__metadata": "{'lr': 1}"}, "'lightfn.metadata' is not valid JSON"),
        "newer": ({"lightfn__format_version": "99"}, "format version 99.*up to 1. Upgrade lightfn"),
        "bad_version": ({"lightfn__format_version": "one"}, "invalid checkpoint format version"),
        "edited": ({"lightfn__metadata": '{"lr": 2}'}, "checksum of lightfn's metadata"),
    }
    for name, (changes, pattern) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        _rewrite_metadata(good, p, **changes)
        with pytest.raises(CheckpointError, match=pattern) as err:
            load(p)
        assert str(p) in str(err.value)
    # Unchecked (verify=False), a structure that disagrees with the header is still refused.
    p = tmp_path / "wrong_key.safetensors"
    _rewrite_metadata(good, p, lightfn__structure='{"kind":"tensor","key":"[\\"nope\\"]","dtype":"float32","shape":[],"crc32":0}')
    with pytest.raises(CheckpointError, match="malformed at <root>: tensor key '\\[\"nope\"\\]' is not in the file"):
        load(p, verify=False)
    with pytest.raises(CheckpointError, match="format version 99"):
        read_metadata(tmp_path / "newer.safetensors")
    dup = tmp_path / "dup.safetensors"
    header = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    dup.write_bytes(len(header).to_bytes(8, "little") + header + b"\1\2")
    with pytest.raises(CheckpointError, match="duplicate key"):
        load(dup)


def test_safetensors_file_not_written_by_lightfn_loads_flat(tmp_path: Path) -> None:
    w, b = torch.randn(4, 3), torch.randn(4)
    p = tmp_path / "hf.safetensors"
    save_file({"enc.0.weight": w, "enc.0.bias": b, "head.weight": w.t().contiguous()}, str(p), metadata={"format": "pt"})
    out = load(p)
    assert set(out) == {"enc.0.weight", "enc.0.bias", "head.weight"} and torch.equal(out["enc.0.weight"], w)
    assert read_metadata(p) == {"metadata": {"format": "pt"}, "hparams": None, "format_version": None, "lightfn_version": None,
                                "torch_version": None}
    sub = load(p, subtree="enc")
    assert set(sub) == {"0.weight", "0.bias"} and torch.equal(sub["0.bias"], b)
    like = {"enc": {"0": {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}}, "head.weight": torch.zeros(3, 4)}
    restored = load(p, like=like)  # template paths matched by their dotted names
    assert torch.equal(restored["enc"]["0"]["weight"], w) and torch.equal(restored["head.weight"], w.t())
    with pytest.raises(CheckpointError, match=r"\['head.weight'\]: in the file"):
        load(p, like={"enc": like["enc"]})


# ----------------------------------------------------------------------------- atomic writes


def test_later_save_removes_stale_temporaries_of_dead_saves(tmp_path: Path) -> None:
    stale = tmp_path / ".ckpt.safetensors.999999999.0badf00d.tmp"  # pid above any pid_max: dead
    alive = tmp_path / f".ckpt.safetensors.{os.getppid()}.0badf00d.tmp"  # a live process's save in flight
    unrelated = tmp_path / ".other.safetensors.999999999.0badf00d.tmp"
    for f in (stale, alive, unrelated):
        f.write_bytes(b"partial")
    save(tmp_path / "ckpt.safetensors", {"a": torch.ones(1)})
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["ckpt.safetensors"]


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from lightfn.checkpoint import save
    leaves = [torch.empty(25 * 2**20 // 4) for _ in range(8)]  # 8 x 25 MB = 200 MB
    i = 0
    while True:
        i += 1
        for t in leaves:
            t.fill_(i)
        save(sys.argv[1], {"i": i, "w": leaves})
        print(i, flush=True)
    """
)


@pytest.mark.slow
def test_kill_during_large_save_leaves_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "big.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(lf.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "1"  # one complete save
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill the next save while in flight
            tmps = list(tmp_path.glob(".big.safetensors.*.tmp"))
            if tmps:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        else:
            pytest.fail("never saw a save in progress")
    finally:
        proc.kill()
        proc.wait()
    assert tmps[0].exists()  # killed mid-save: its temporary is left behind, the target untouched
    out = load(target)
    assert out["i"] >= 1 and all(torch.all(t == out["i"]) for t in out["w"])
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["big.safetensors"]
    save(target, {"i": 0})  # the next save cleans the dead save's temporary up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]


# ----------------------------------------------------------------------------- fuzzing


def _fuzz_tree() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 3, generator=g)
    return {
        "params": {"enc.0.weight": w, "b": torch.randn(3, generator=g).to(torch.bfloat16)},
        "tied": w,
        "opt": AdamState(mu=torch.zeros(2, dtype=torch.float16), nu=[torch.tensor(9), 2.5]),
        "mask": torch.tensor([True, False]),
        "step": 11,
        "name": "run-1",
        "none": None,
    }


def _fuzz_file() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return save(Path(d) / "f.safetensors", _fuzz_tree(), metadata={"lr": 0.5}).read_bytes()


_FUZZ_BYTES = _fuzz_file()
_FUZZ_HEADER_END = 8 + int.from_bytes(_FUZZ_BYTES[:8], "little")
_position = st.one_of(st.integers(0, _FUZZ_HEADER_END - 1), st.integers(0, len(_FUZZ_BYTES) - 1))
_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("set"), _position, st.integers(0, 255)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _position, st.integers(1, 8)),
    st.tuples(st.just("truncate"), _position),
)


def _mutate(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    for op, pos, *arg in mutations:
        pos = min(pos, max(len(buf) - 1, 0))
        if op == "flip" and buf:
            buf[pos] ^= 1 << arg[0]
        elif op == "set" and buf:
            buf[pos] = arg[0]
        elif op == "insert":
            buf[pos:pos] = arg[0]
        elif op == "delete":
            del buf[pos : pos + arg[0]]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(_mutation, min_size=1, max_size=3))
def test_fuzzed_files_only_raise_checkpoint_error_or_load_correctly(mutations: list[tuple[Any, ...]]) -> None:
    expected = _fuzz_tree()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        p.write_bytes(_mutate(_FUZZ_BYTES, mutations))
        try:
            out = load(p, like=_fuzz_tree())
            assert_same(out, expected)
            assert out["tied"] is out["params"]["enc.0.weight"]
        except CheckpointError:
            pass
        try:
            out = load(p)
            assert_same(out["params"], expected["params"])
            assert out["opt"]["nu"][1] == 2.5 and out["name"] == "run-1"
        except CheckpointError:
            pass
        try:
            assert read_metadata(p)["metadata"] == {"lr": 0.5}
        except CheckpointError:
            pass
        try:
            load(p, verify=False)  # unchecked: may load damaged values, but never fails any other way
        except CheckpointError:
            pass
