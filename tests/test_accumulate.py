import pytest
import torch

import lightfn as lf
from lightfn.fit import _checks as runner


def _problem():
    x, y = torch.randn(16, 3), torch.randn(16)
    params = {"w": torch.zeros(3)}
    opt = lf.optim.sgd(0.1)
    return params, opt, lf.data.ArrayLoader((x, y), batch_size=8, shuffle=False)


def test_untraceable_step_that_runs_eagerly_is_told_to_use_jit_false():
    params, opt, loader = _problem()

    def loss_fn(p, batch):
        loss = ((batch[0] @ p["w"] - batch[1]) ** 2).mean()
        if loss.item() > 1e9:  # data-dependent Python branch: fine eagerly, not traceable
            loss = loss * 0
        return loss

    state = lf.TrainState.create(params=params, optimizer=opt)
    with pytest.raises(lf.CompileError, match="could not trace") as info:
        lf.fit(lf.train_step(loss_fn, opt), state, loader, max_epochs=1, jit="sync", progress=False)
    assert "pass jit=False" in str(info.value)
    assert torch.equal(state.params["w"], torch.zeros(3)) and state.step.item() == 0
    # and the advice is right: eagerly it trains
    out = lf.fit(lf.train_step(loss_fn, opt), state, loader, max_epochs=1, jit=False, progress=False)
    assert out.step.item() == 2


def test_step_broken_eagerly_too_is_not_told_to_use_jit_false():
    params, opt, loader = _problem()

    def step(state, batch):  # a shape bug, not a compilation problem
        bad = batch[0] @ torch.ones(4)
        return state, {"loss": bad.sum()}

    state = lf.TrainState.create(params=params, optimizer=opt)
    with pytest.raises(lf.StepError, match="fails when run eagerly too") as info:
        lf.fit(step, state, loader, max_epochs=1, jit="sync", progress=False)
    assert "pass jit=False" not in str(info.value) and "would not help" in str(info.value)


def test_abstract_eval_returns_shapes_without_touching_inputs():
    x = torch.ones(2, 3)
    out = runner.abstract_eval(lambda t: (t * 2).sum(0), x)
    assert tuple(out.shape) == (3,) and torch.equal(x, torch.ones(2, 3))
