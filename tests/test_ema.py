"""lf.callbacks.EMA: the average equals the formula, validation judges it, resume is exact;
the SWA and unfreeze patterns of its docstring work."""

from __future__ import annotations

import pytest
import torch

import lightfn as lf
from lightfn.callbacks import EMA, Callback, ModelCheckpoint, Signal
from lightfn.errors import MisconfigurationError
from memory_logger import MemoryLogger


def loss_fn(p, batch):
    x, y = batch
    err = torch.tanh(x @ p["w1"]) @ p["w2"] + p["b"] - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def setup(seed=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(44, 4, generator=g)
    y = torch.sin(x).sum(1)
    params = {"w1": torch.randn(4, 8, generator=g) * 0.3, "w2": torch.randn(8, generator=g) * 0.3, "b": torch.zeros(())}
    opt = lf.optim.adam(0.05)
    state = lf.TrainState.create(params=params, optimizer=opt)
    train = lf.data.ArrayLoader((x, y), batch_size=8, shuffle=True, seed=seed, drop_last=False)  # 6 batches, the last ragged
    val = lf.data.ArrayLoader((x[:16], y[:16]), batch_size=8, shuffle=False)
    return lf.train_step(loss_fn, opt), state, train, val


def run(callbacks, **kw):
    step, state, train, val = setup()
    kw.setdefault("max_epochs", 3)
    kw.setdefault("jit", False)
    return lf.fit(step, state, train, val_data=val, eval_step=lf.eval_step(loss_fn), progress=False,
                  summary=False, callbacks=callbacks, **kw)


class Params(Callback):
    def __init__(self):
        self.seen = {}

    def on_fit_start(self, ctx):
        self.seen[0] = lf.tree.map(torch.clone, ctx.state.params)

    def on_train_batch_end(self, ctx):
        self.seen[ctx.step] = lf.tree.map(torch.clone, ctx.state.params)


@pytest.mark.parametrize("start_step", [0, 4])
def test_the_average_follows_the_formula(start_step):
    decay = 0.9
    ema, params = EMA(decay, start_step=start_step), Params()
    run([params, ema], max_epochs=2)
    expected = params.seen[0]
    for s in range(1, 13):
        p = params.seen[s]
        if s <= start_step:
            expected = p
        else:  # in float64: the callback's float32 result must be within rounding of it
            expected = {k: expected[k].double() * decay + p[k].double() * (1 - decay) for k in p}
    for k, v in ema.params.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.double(), expected[k].double(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema.params["w1"], params.seen[12]["w1"])


def test_validation_evaluates_the_average_and_training_its_own_params():
    step, _, _, val = setup()
    evaluate = lf.eval_step(loss_fn)
    for with_ema in (True, False):
        ema, logger = EMA(0.8, validate_with_ema=with_ema), MemoryLogger()
        state = run([ema], loggers=[logger])
        averaged = lf.validate(evaluate, state.replace(params=ema.params), val)["val/loss"]
        own = lf.validate(evaluate, state, val)["val/loss"]
        assert averaged != pytest.approx(own, rel=1e-3)
        assert logger.values("val/loss")[-1][1] == pytest.approx(averaged if with_ema else own, rel=1e-6)


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    ema = EMA(0.7, start_step=2)
    ckpt = ModelCheckpoint(tmp_path / "a", filename="{step}", every_n_steps=4, save_top_k=-1)
    logger = MemoryLogger()
    final = run([ema, ckpt], loggers=[logger])
    saved = lf.load(tmp_path / "a" / "8.safetensors")["callbacks"]["EMA[decay=0.7]"]
    assert set(saved["tensors"]["params"]) == {"['w1']", "['w2']", "['b']"}
    for at in ("4", "8"):  # mid-epoch 0 / mid-epoch 1 (6 batches an epoch)
        resumed_ema, resumed_logger = EMA(0.7, start_step=2), MemoryLogger()
        resumed = run([resumed_ema, ModelCheckpoint(tmp_path / f"b{at}", every_n_steps=100)], loggers=[resumed_logger],
                      resume_from=tmp_path / "a" / f"{at}.safetensors")
        for a, b in zip(lf.tree.leaves((resumed, resumed_ema.params)), lf.tree.leaves((final, ema.params))):
            assert torch.equal(a, b)
        assert resumed_logger.values("val/loss")[-1] == logger.values("val/loss")[-1]


def test_resume_with_other_arguments_or_another_model_is_refused(tmp_path):
    run([EMA(0.7), ModelCheckpoint(tmp_path, every_n_steps=4)], max_epochs=1)
    with pytest.raises(MisconfigurationError, match="resume with the same arguments"):
        run([EMA(0.7, start_step=3)], resume_from=tmp_path / "last.safetensors")
    other = EMA(0.7)
    other.load_state_dict({"decay": 0.7, "start_step": 0, "params": {"['w1']": torch.zeros(3), "['w2']": torch.zeros(8),
                                                                      "['b']": torch.zeros(())}})
    with pytest.raises(MisconfigurationError, match=r"\['w1'\] is torch.float32 \(3,\), the params' is torch.float32 \(4, 8\)"):
        run([other])
    with pytest.raises(MisconfigurationError, match="decay must be"):
        EMA(1.5)
    with pytest.raises(MisconfigurationError, match="no average yet"):
        EMA().params


def test_the_docstring_swa_pattern_returns_the_average():
    class SWA(Callback):
        def __init__(self, start):
            self.start, self.n, self.avg = start, 0, None

        def on_epoch_end(self, ctx):
            if ctx.epoch >= self.start:
                p, self.n = ctx.state.params, self.n + 1
                self.avg = (lf.tree.map(torch.clone, p) if self.avg is None
                            else lf.tree.map(lambda a, x: a + (x - a) / self.n, self.avg, p))

        def on_fit_end(self, ctx):
            if self.avg is not None:
                return Signal(state=ctx.state.replace(params=self.avg))

    class EpochEnds(Callback):
        def __init__(self):
            self.params = []

        def on_epoch_end(self, ctx):
            self.params.append(lf.tree.map(torch.clone, ctx.state.params))

    ends = EpochEnds()
    state = run([ends, SWA(start=1)])
    for k, v in state.params.items():
        torch.testing.assert_close(v, (ends.params[1][k] + ends.params[2][k]) / 2, rtol=1e-6, atol=1e-7)


def test_the_docstring_unfreeze_pattern_trains_the_backbone_from_epoch_n():
    backbone = lf.optim.inject_hyperparams(lf.optim.adam)(lr=0.0)
    opt = lf.optim.multi_transform({"backbone": backbone, "head": lf.optim.adam(1e-2)},
                                   {"w1": "backbone", "w2": "head", "b": "head"})

    class Unfreeze(Callback):
        def __init__(self, n, lr):
            self.n, self.lr = n, lr

        def on_train_epoch_start(self, ctx):
            if ctx.epoch != self.n:
                return None

            def set_lr(path, x):
                key = lf.tree.keystr(path)
                return torch.full_like(x, self.lr) if "'backbone'" in key and key.endswith("['lr']") else x

            return Signal(state=ctx.state.replace(opt_state=lf.tree.map_with_path(set_lr, ctx.state.opt_state)))

    _, state, train, val = setup()
    state = lf.TrainState.create(params=state.params, optimizer=opt)
    params = Params()
    lf.fit(lf.train_step(loss_fn, opt), state, train, max_epochs=2, jit=False, progress=False, summary=False,
           callbacks=[Unfreeze(1, 1e-2), params])
    assert torch.equal(params.seen[6]["w1"], params.seen[0]["w1"])  # frozen through epoch 0
    assert not torch.equal(params.seen[7]["w1"], params.seen[6]["w1"])  # trains from epoch 1
    assert not torch.equal(params.seen[6]["w2"], params.seen[0]["w2"])


@pytest.mark.compile
def test_compiled_fit_validates_the_average_and_reports_batch_metrics():
    class Batches(Callback):
        def __init__(self):
            self.losses = []

        def on_validation_batch_end(self, ctx):
            self.losses.append(float(ctx.batch_metrics["val/loss"]))

    ema, batches, logger = EMA(0.8), Batches(), MemoryLogger()
    state = run([ema, batches], loggers=[logger], jit="sync", max_epochs=2, num_sanity_val_steps=0)
    _, _, _, val = setup()
    expected = lf.validate(lf.eval_step(loss_fn), state.replace(params=ema.params), val)["val/loss"]
    assert logger.values("val/loss")[-1][1] == pytest.approx(expected, rel=1e-5)
    assert len(batches.losses) == 4 and sum(batches.losses[-2:]) / 2 == pytest.approx(expected, rel=1e-5)
