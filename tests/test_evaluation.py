"""lf.validate / lf.test: fit's validation pass on any state, row-weighted, logged."""

from __future__ import annotations

import pytest
import torch

import lightfn as lf
from lightfn.callbacks import Callback, EarlyStopping, ModelCheckpoint, Signal
from lightfn.fit import FitError
from memory_logger import MemoryLogger

D = 3


def loss_fn(p, batch):
    x, y = batch
    err = x @ p["w"] + p["b"] - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)


def setup():
    opt = lf.optim.sgd(0.05)
    state = lf.TrainState.create(params={"w": torch.zeros(D), "b": torch.zeros(())}, optimizer=opt)
    return lf.train_step(loss_fn, opt), state, lf.data.ArrayLoader(data(32, 0), batch_size=8, seed=3)


def test_validate_equals_fits_own_validation_on_the_same_state_and_data():
    step, state, train = setup()
    val = lf.data.ArrayLoader(data(20, 1), batch_size=6, shuffle=False)  # 6, 6, 6, 2 rows
    logger = MemoryLogger()
    evaluate = lf.eval_step(loss_fn)
    trained = lf.fit(step, state, train, val_data=val, eval_step=evaluate, max_epochs=3, jit=False, progress=False,
                     num_sanity_val_steps=0, loggers=[logger])
    last = {k: v for k, v in logger.by_step()[12].items() if k.startswith("val/")}
    assert set(last) == {"val/loss", "val/mae"}
    assert lf.validate(evaluate, trained, val, progress=False) == last  # the same floats, bit for bit
    assert lf.test(evaluate, trained, val, progress=False) == {"test/loss": last["val/loss"], "test/mae": last["val/mae"]}
    assert lf.validate(evaluate, trained, val, device="cpu", progress=False) == last


def test_means_are_weighted_by_rows_over_an_uneven_last_batch():
    _, state, _ = setup()
    state = state.replace(params={"w": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor(0.25)})
    x, y = data(10, 2)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # 4, 4, 2 rows
    out = lf.validate(lf.eval_step(loss_fn), state, batches, progress=False)
    loss, metrics = loss_fn(state.params, (x, y))  # over all 10 rows at once
    assert out["val/loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert out["val/mae"] == pytest.approx(metrics["mae"].item(), rel=1e-6)
    per_batch = sum(loss_fn(state.params, b)[0].item() for b in batches) / 3
    assert abs(per_batch - out["val/loss"]) > 1e-3  # an unweighted mean of batch means would differ


class Seen(Callback):
    def __init__(self):
        self.seen = []

    def on_validation_end(self, ctx):
        self.seen.append((ctx.stage, ctx.step, dict(ctx.metrics)))
        return Signal(log={"extra/rows": 10.0}, stop=True)  # stop: no loop here, ignored


def test_loggers_and_callbacks_receive_the_values_at_the_states_step():
    step, state, train = setup()
    state = lf.fit(step, state, train, max_epochs=1, jit=False, progress=False)  # 4 steps
    logger, seen = MemoryLogger(), Seen()
    stopper = EarlyStopping(monitor="val/loss", patience=0)
    x, y = data(10, 2)
    out = lf.validate(lf.eval_step(loss_fn), state, [(x, y)], loggers=[logger], callbacks=[seen, stopper], progress=False)
    assert set(out) == {"val/loss", "val/mae", "extra/rows"} and out["extra/rows"] == 10.0
    assert logger.rows == [(4, out)]
    assert seen.seen == [("eval", 4, {"val/loss": out["val/loss"], "val/mae": out["val/mae"]})]
    assert stopper.state_dict() == EarlyStopping(monitor="val/loss", patience=0).state_dict()  # fit's callbacks ignore it
    logger, seen = MemoryLogger(), Seen()
    scores = lf.test(lf.eval_step(loss_fn), state, [(x, y)], loggers=[logger], callbacks=[seen], progress=False)
    assert logger.rows == [(4, scores)] and seen.seen[0][0] == "test"
    assert scores["test/loss"] == out["val/loss"]


def test_the_best_checkpoint_to_a_test_score_in_one_line(tmp_path):
    step, state, train = setup()
    val = lf.data.ArrayLoader(data(16, 1), batch_size=5, shuffle=False, drop_last=False)
    test_data = [data(12, 4)]
    evaluate = lf.eval_step(loss_fn)
    ckpt = ModelCheckpoint(tmp_path, monitor="val/loss", save_top_k=1)
    assert ckpt.best_model_path is None
    lf.fit(step, state, train, val_data=val, eval_step=evaluate, max_epochs=4, jit=False, progress=False,
           callbacks=[ckpt])
    assert ckpt.best_model_path is not None
    best = lf.load(ckpt.best_model_path, like=state)
    # reloading the best checkpoint reproduces the score it was kept for
    assert lf.validate(evaluate, best, val, progress=False)["val/loss"] == ckpt.best_model_score
    scores = lf.test(evaluate, lf.load(ckpt.best_model_path, like=state), test_data, progress=False)
    assert scores["test/loss"] == pytest.approx(loss_fn(best.params, test_data[0])[0].item(), rel=1e-6)


def test_empty_data_and_a_missing_step_are_refused():
    _, state, _ = setup()
    with pytest.raises(FitError, match="data yielded no batches"):
        lf.validate(lf.eval_step(loss_fn), state, [], progress=False)
    with pytest.raises(FitError, match="eval_step must be a function"):
        lf.test(None, state, [data(4, 0)], progress=False)


def test_validate_and_test_are_exported():
    assert {"validate", "test"} <= set(lf.__all__)


@pytest.mark.compile
def test_compiled_validate_matches_eager_over_several_sets_with_uneven_batches():
    _, state, _ = setup()
    state = state.replace(params={"w": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor(0.25)})
    sets = {"a": lf.data.ArrayLoader(data(11, 1), batch_size=4, shuffle=False, drop_last=False),
            "b": lf.data.ArrayLoader(data(7, 2), batch_size=3, shuffle=False, drop_last=False)}
    evaluate = lf.eval_step(loss_fn)
    eager = lf.validate(evaluate, state, sets, progress=False)
    compiled = lf.validate(evaluate, state, sets, jit=True, progress=False)
    assert set(compiled) == {"val/a/loss", "val/a/mae", "val/b/loss", "val/b/mae"}
    for k, v in eager.items():
        assert compiled[k] == pytest.approx(v, rel=1e-5)
