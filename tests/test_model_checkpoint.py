"""ModelCheckpoint over real fit runs: Lightning's top-k / last / schedule semantics, what a
checkpoint holds, and loading its params for inference."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import lightfn as lf
from lightfn.callbacks import Callback, Context, EarlyStopping, MisconfigurationError, ModelCheckpoint
from lightfn.fit import fit
from memory_logger import MemoryLogger

D = 4
SAFE = re.compile(r"[A-Za-z0-9._=+-]+")


def loss_fn(p, batch):
    x, y = batch
    err = x @ p["w"] + p["b"] - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.3 * torch.randn(n, generator=g)


def setup(lr=0.05, n=32, batch_size=8, **kw):
    """4 batches per epoch by default."""
    opt = lf.optim.sgd(lr)
    state = lf.TrainState.create(params={"w": torch.zeros(D), "b": torch.zeros(())}, optimizer=opt)
    return lf.train_step(loss_fn, opt), state, lf.data.ArrayLoader(data(n, 0), batch_size=batch_size, seed=5, **kw)


def run(step, state, train, **kw):
    kw.setdefault("jit", False)
    kw.setdefault("progress", False)
    kw.setdefault("num_sanity_val_steps", 0)
    return fit(step, state, train, **kw)


def scripted_eval(values, name="loss", steps_per_epoch=4):
    """An eval step whose metric after epoch e is ``values[e]`` (one val batch: exact means)."""

    def eval_fn(state, batch):
        return {name: torch.tensor(values[int(state.step) // steps_per_epoch - 1])}

    return eval_fn


VAL = [(torch.zeros(8, D), torch.zeros(8))]  # one batch


class Listing(Callback):
    """The checkpoint folder's files at the first batch of each epoch (after the previous
    epoch's saves and deletes) and at the end."""

    def __init__(self, dirpath):
        self.dirpath, self.seen = dirpath, []

    def _snap(self):
        self.seen.append(sorted(p.name for p in self.dirpath.iterdir()) if self.dirpath.exists() else [])

    def on_train_batch_end(self, ctx):
        if ctx.batch_idx == 1 and ctx.epoch > 0:
            self._snap()

    def on_fit_end(self, ctx):
        self._snap()


def files(dirpath):
    return sorted(p.name for p in dirpath.iterdir())


# ----------------------------------------------------------------------------- top k


def test_top_k_keeps_the_best_files_and_deletes_what_falls_out(tmp_path):
    step, state, train = setup()
    ck = ModelCheckpoint(tmp_path, monitor="val/loss", save_top_k=2)
    listing = Listing(tmp_path)
    run(step, state, train, val_data=VAL, eval_step=scripted_eval([0.5, 0.75, 0.25, 0.875, 0.375]), max_epochs=5,
        callbacks=[ck, listing])
    name = "epoch={}-step={}-val_loss={}.safetensors".format
    e0, e1, e2, e4 = name(0, 4, "0.5000"), name(1, 8, "0.7500"), name(2, 12, "0.2500"), name(4, 20, "0.3750")
    assert listing.seen == [
        [e0, "last.safetensors"],
        [e0, e1, "last.safetensors"],
        [e0, e2, "last.safetensors"],  # 0.25 pushed 0.75 out
        [e0, e2, "last.safetensors"],  # 0.875 is worse than both: not written at all
        [e2, e4, "last.safetensors"],  # 0.375 pushed 0.5 out
    ]
    assert {p.rsplit("/", 1)[-1]: s for p, s in ck.best_k_models.items()} == {e2: 0.25, e4: 0.375}
    assert ck.best_model_path == str(tmp_path / e2) and ck.best_model_score == 0.25
    assert lf.load(tmp_path / e2, subtree="loop")["step"] == 12  # the file is the state of that epoch


def test_mode_max_and_save_top_k_minus_one_and_zero(tmp_path):
    step, state, train = setup()
    acc = [0.5, 0.75, 0.25, 0.875]
    ck = ModelCheckpoint(tmp_path / "max", monitor="val/acc", mode="max", save_top_k=2, save_last=False)
    every = ModelCheckpoint(tmp_path / "all", monitor="val/acc", save_top_k=-1, save_last=False)
    none = ModelCheckpoint(tmp_path / "none", monitor="val/acc", save_top_k=0)
    run(step, state, train, val_data=VAL, eval_step=scripted_eval(acc, "acc"), max_epochs=4, callbacks=[ck, every, none])
    assert files(tmp_path / "max") == ["epoch=1-step=8-val_acc=0.7500.safetensors", "epoch=3-step=16-val_acc=0.8750.safetensors"]
    assert ck.best_model_score == 0.875 and ck.best_model_path.endswith("epoch=3-step=16-val_acc=0.8750.safetensors")
    assert len(files(tmp_path / "all")) == 4
    assert files(tmp_path / "none") == ["last.safetensors"]


def test_a_real_run_keeps_the_k_lowest_logged_val_losses(tmp_path):
    step, state, train = setup(lr=0.3)  # large steps: val/loss does not fall monotonically
    val = lf.data.ArrayLoader(data(16, 1), batch_size=16, shuffle=False)
    logger = MemoryLogger()
    ck = ModelCheckpoint(tmp_path, monitor="val/loss", save_top_k=3)
    run(step, state, train, val_data=val, eval_step=lf.eval_step(loss_fn), max_epochs=8, callbacks=[ck],
        loggers=[logger])
    logged = logger.values("val/loss")
    assert len(logged) == 8
    best = sorted(logged, key=lambda sv: sv[1])[:3]
    assert files(tmp_path) == sorted([f"epoch={s // 4 - 1}-step={s}-val_loss={v:.4f}.safetensors" for s, v in best]
                                     + ["last.safetensors"])
    assert ck.best_model_score == best[0][1]
    # the best file holds the params that scored best_model_score
    params = lf.load(ck.best_model_path)["params"]
    assert loss_fn(params, tuple(val.iter_epoch(0))[0])[0].item() == pytest.approx(ck.best_model_score, rel=1e-6)


# ----------------------------------------------------------------------------- names


def test_filenames_carry_epoch_step_and_metric_and_are_filesystem_safe(tmp_path):
    step, state, train = setup()
    ck = ModelCheckpoint(tmp_path, filename="run:{epoch}/{step} {val_mae:.2f}*?", monitor="val/loss", save_top_k=-1,
                         save_last=False)
    val = lf.data.ArrayLoader(data(8, 1), batch_size=8, shuffle=False)
    run(step, state, train, val_data=val, eval_step=lf.eval_step(loss_fn), max_epochs=2, callbacks=[ck])
    names = files(tmp_path)
    assert [p.is_file() for p in tmp_path.iterdir()] == [True, True]  # no sub-folder from the "/"
    assert all(SAFE.fullmatch(n) for n in names), names
    for n, (epoch, s) in zip(names, [(0, 4), (1, 8)]):
        assert re.fullmatch(rf"run_{epoch}_{s}_\d+\.\d\d__-val_loss=\d+\.\d{{4}}\.safetensors", n), n
    with pytest.raises(MisconfigurationError, match="available keys: .*val_loss"):
        run(step, state, train, val_data=val, eval_step=lf.eval_step(loss_fn), max_epochs=1,
            callbacks=[ModelCheckpoint(tmp_path / "bad", filename="{val_los}", monitor="val/loss")])


# ----------------------------------------------------------------------------- schedules


def test_save_last_holds_the_final_state(tmp_path):
    step, state, train = setup()
    out = run(step, state, train, max_epochs=3, callbacks=[ModelCheckpoint(tmp_path)])
    assert files(tmp_path) == ["epoch=2-step=12.safetensors", "last.safetensors"]  # top 1 without monitor: latest
    last = lf.load(tmp_path / "last.safetensors")
    for k in ("w", "b"):
        assert torch.equal(last["params"][k], out.params[k])
    assert last["step"].item() == 12 and (last["loop"]["epoch"], last["loop"]["batch"]) == (3, 0)
    run(step, state, train, max_epochs=1, callbacks=[ModelCheckpoint(tmp_path / "nolast", save_last=False)])
    assert files(tmp_path / "nolast") == ["epoch=0-step=4.safetensors"]


def test_every_n_steps_replaces_the_epoch_schedule(tmp_path):
    step, state, train = setup()
    ck = ModelCheckpoint(tmp_path, every_n_steps=3, save_top_k=-1, save_last=False)
    run(step, state, train, max_epochs=3, callbacks=[ck])  # 12 steps
    assert files(tmp_path) == sorted(f"epoch={s // 4 - (s % 4 == 0)}-step={s}.safetensors" for s in (3, 6, 9, 12))
    # mid-epoch files record the position within the epoch
    assert [lf.load(tmp_path / f"epoch={s // 4}-step={s}.safetensors", subtree="loop")["batch"] for s in (3, 6, 9)] == [3, 2, 1]


def test_every_n_epochs(tmp_path):
    step, state, train = setup()
    run(step, state, train, max_epochs=5, callbacks=[ModelCheckpoint(tmp_path, every_n_epochs=2, save_top_k=-1)])
    assert files(tmp_path) == ["epoch=1-step=8.safetensors", "epoch=3-step=16.safetensors", "last.safetensors"]
    run(step, state, train, max_epochs=2, callbacks=[ModelCheckpoint(tmp_path / "never", every_n_epochs=0)])
    assert not (tmp_path / "never").exists()


def test_train_time_interval(tmp_path):
    # the decision, driven by chosen clock values
    ck = ModelCheckpoint(tmp_path, train_time_interval=dict(seconds=10), save_top_k=-1, save_last=False)

    def ctx(step, elapsed):
        return Context(state=None, step=step, epoch=0, batch_idx=step, metrics={}, elapsed=elapsed)

    ck.on_fit_start(ctx(0, 0.0))
    saved = [s for s, t in [(1, 4.0), (2, 9.9), (3, 10.0), (4, 15.0), (5, 20.5), (6, 30.5)] if ck.on_train_batch_end(ctx(s, t))]
    assert saved == [3, 5, 6]
    assert ck.on_epoch_end(ctx(6, 31.0)) is None  # the time schedule replaces the epoch one
    # in fit: an interval of 0 saves after every step; an hour never within this run
    step, state, train = setup()
    run(step, state, train, max_epochs=1, callbacks=[ModelCheckpoint(tmp_path / "zero", train_time_interval=0, save_top_k=-1)])
    assert files(tmp_path / "zero") == [f"epoch=0-step={s}.safetensors" for s in range(1, 5)] + ["last.safetensors"]
    run(step, state, train, max_epochs=2, callbacks=[ModelCheckpoint(tmp_path / "hour", train_time_interval="00:01:00:00")])
    assert not (tmp_path / "hour").exists()


def test_save_on_exception(tmp_path):
    x, y = data(16, 0)

    def step(s, batch):
        if int(s["k"]) == 2:
            raise RuntimeError("boom at the third step")
        return {"k": s["k"] + 1, "w": s["w"] + 1}, {"loss": batch[1].mean()}

    state = {"k": torch.zeros((), dtype=torch.int64), "w": torch.zeros(3)}
    with pytest.raises(RuntimeError, match="boom"):
        run(step, state, [(x[:8], y[:8]), (x[8:], y[8:])], max_epochs=3,
            callbacks=[ModelCheckpoint(tmp_path, save_on_exception=True, save_last=False)])
    ckpt = lf.load(tmp_path / "exception-epoch=1-step=2.safetensors")
    assert ckpt["k"].item() == 2 and torch.equal(ckpt["w"], torch.full((3,), 2.0))
    assert (ckpt["loop"]["epoch"], ckpt["loop"]["batch"], ckpt["loop"]["step"]) == (1, 0, 2)
    with pytest.raises(RuntimeError, match="boom"):
        run(step, state, [(x[:8], y[:8])], max_epochs=3, callbacks=[ModelCheckpoint(tmp_path / "off")])
    assert files(tmp_path / "off") == ["epoch=1-step=2.safetensors", "last.safetensors"]  # the schedule's, no exception file


# ----------------------------------------------------------------------------- errors


def test_a_monitor_that_is_never_logged_is_a_clear_error(tmp_path):
    step, state, train = setup()
    ev = lf.eval_step(loss_fn)
    with pytest.raises(MisconfigurationError, match=r"monitors 'val/acc'.*logged metrics: .*'val/loss', 'val/mae'"):
        run(step, state, train, val_data=VAL, eval_step=ev, max_epochs=2, callbacks=[ModelCheckpoint(tmp_path, monitor="val/acc")])
    with pytest.raises(MisconfigurationError, match="No validation ran"):
        run(step, state, train, max_epochs=2, callbacks=[ModelCheckpoint(tmp_path, monitor="val/loss")])
    with pytest.raises(MisconfigurationError, match=r"monitors 'train/los'.*'train/loss_epoch'"):
        run(step, state, train, max_epochs=1, callbacks=[ModelCheckpoint(tmp_path, monitor="train/los")])
    with pytest.raises(MisconfigurationError, match="save_top_k=-1 to keep every file"):
        ModelCheckpoint(tmp_path, save_top_k=3)
    with pytest.raises(MisconfigurationError, match="mode must be 'min' or 'max'"):
        ModelCheckpoint(tmp_path, monitor="val/loss", mode="best")
    # a train metric (step values and epoch means) can be monitored
    ck = ModelCheckpoint(tmp_path / "train", monitor="train/loss_epoch")
    run(step, state, train, max_epochs=2, callbacks=[ck])
    assert re.fullmatch(r"epoch=\d-step=\d+-train_loss_epoch=\d+\.\d{4}\.safetensors", files(tmp_path / "train")[0])


# ----------------------------------------------------------------------------- contents


def test_a_checkpoint_holds_the_whole_loop_state(tmp_path):
    step, state, train = setup(lr=0.01)
    val = lf.data.ArrayLoader(data(8, 1), batch_size=8, shuffle=False)
    es = EarlyStopping(monitor="val/loss", patience=5)
    ck = ModelCheckpoint(tmp_path, every_n_steps=6, save_top_k=-1)
    out = run(step, state, train, val_data=val, eval_step=lf.eval_step(loss_fn), max_epochs=2, precision="16-mixed",
              callbacks=[ck, es])
    ckpt = lf.load(tmp_path / "epoch=1-step=6.safetensors")  # mid-epoch 1
    assert set(ckpt) == {"step", "params", "opt_state", "rng", "buffers", "loss_scale", "extra", "loop", "callbacks"}
    assert ckpt["step"].item() == 6 and ckpt["rng"].dtype == state.rng.dtype and ckpt["rng"].shape == state.rng.shape
    assert set(ckpt["loss_scale"]) == {"scale", "good_steps"} and 0 < ckpt["loss_scale"]["scale"].item() <= 2.0**16
    loop = ckpt["loop"]
    assert (loop["epoch"], loop["batch"], loop["step"], loop["last_val_step"]) == (1, 2, 6, 4)
    assert loop["data_seed"] == "5" and json.loads(loop["metrics"]) == ["loss", "mae", "loss_scale"]
    assert loop["acc"].shape == (4,) and loop["acc"][-1].item() == 16  # sums over the epoch's 2 batches of 8 rows
    assert json.loads(loop["logged"])["val/loss"] > 0
    cbs = {k: json.loads(v) for k, v in ckpt["callbacks"].items()}
    assert cbs["EarlyStopping[val/loss]"]["wait_count"] == 0 and cbs["EarlyStopping[val/loss]"]["best_score"] > 0
    assert [p.rsplit("/", 1)[-1] for p, _ in cbs[ck.state_key]["best_k_models"]] == ["epoch=1-step=6.safetensors"]
    # last.safetensors is refreshed with each save (here only at step 6), not at the end
    last = lf.load(tmp_path / "last.safetensors")
    assert last["loop"]["step"] == 6 and torch.equal(last["params"]["w"], ckpt["params"]["w"])
    assert not torch.equal(last["params"]["w"], out.params["w"])
    # what fit resumes from holds the loss scale it reached
    ck2 = ModelCheckpoint(tmp_path / "end", every_n_epochs=2)
    out = run(step, state, train, max_epochs=2, precision="16-mixed", callbacks=[ck2])
    end = lf.load(tmp_path / "end" / "last.safetensors", subtree="loss_scale")
    assert torch.equal(end["scale"], out.loss_scale.scale) and torch.equal(end["good_steps"], out.loss_scale.good_steps)
    # any safetensors reader opens a fit checkpoint
    with safe_open(str(tmp_path / "last.safetensors"), framework="pt") as f:
        assert len(f.keys()) >= 5


def test_params_of_a_sub_model_drop_into_its_apply(tmp_path):
    torch.manual_seed(0)
    enc_apply, enc = lf.functionalize(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)))
    dec_apply, dec = lf.functionalize(torch.nn.Linear(2, 8))

    def ae_loss(p, x):
        return ((dec_apply(p["decoder"], enc_apply(p["encoder"], x)) - x) ** 2).mean()

    x = torch.randn(32, 8)
    opt = lf.optim.adam(1e-2)
    state = lf.TrainState.create(params={"encoder": enc, "decoder": dec}, optimizer=opt)
    ck = ModelCheckpoint(tmp_path, monitor="val/loss")
    out = run(lf.train_step(ae_loss, opt), state, lf.data.ArrayLoader(x, batch_size=8), max_epochs=3,
              val_data=lf.data.ArrayLoader(x, batch_size=16, shuffle=False), eval_step=lf.eval_step(ae_loss),
              callbacks=[ck])
    params = lf.load(tmp_path / "last.safetensors")["params"]
    assert sorted(params["encoder"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # dotted names kept
    assert torch.equal(enc_apply(params["encoder"], x), enc_apply(out.params["encoder"], x))
    only = lf.load(ck.best_model_path, subtree=("params", "encoder"))  # reads nothing else
    assert enc_apply(only, x).shape == (32, 2)
