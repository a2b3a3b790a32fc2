"""Bad input to lf.optim raises lightfn errors that name the pytree path."""

from __future__ import annotations

import pytest
import torch

import lightfn as lf
from lightfn import optim


def params():
    return {"enc": {"w": torch.ones(4, 3), "b": torch.zeros(4)}, "head": {"w": torch.ones(2, 4)}}


def grads():
    return lf.tree.map(torch.ones_like, params())


def test_grads_missing_a_leaf():
    opt = optim.sgd(0.1)
    g = grads()
    del g["enc"]["b"]
    with pytest.raises(lf.TreeError, match=r"\['enc'\]\['b'\]: missing"):
        opt.update(g, opt.init(params()), params())


def test_grads_with_an_extra_leaf_without_params():
    opt = optim.adam()
    g = grads()
    g["head"]["b"] = torch.ones(2)
    with pytest.raises(lf.TreeError, match=r"\['head'\]\['b'\]: unexpected"):
        opt.update(g, opt.init(params()))  # no params: checked against adam's moments


def test_grad_with_the_wrong_shape():
    opt = optim.rmsprop()
    g = grads()
    g["enc"]["w"] = torch.ones(3, 4)
    with pytest.raises(lf.TreeError, match=r"\['enc'\]\['w'\].*\(3, 4\).*expected \(4, 3\)"):
        opt.update(g, opt.init(params()), params())


def test_apply_updates_mismatch_names_the_leaf():
    u = grads()
    u["head"]["w"] = torch.ones(2)
    with pytest.raises(lf.TreeError, match=r"\['head'\]\['w'\]"):
        optim.apply_updates(params(), u)


def test_state_from_another_optimizer_of_different_length():
    with pytest.raises(lf.StepError, match=r"opt_state: chain of 1 transforms .* got a tuple of 2 \(ScaleByAdamState"):
        optim.sgd(0.1).update(grads(), optim.adam().init(params()), params())


def test_state_from_another_optimizer_of_same_length_names_the_sub_state():
    sgd_state = optim.sgd(0.1, momentum=0.9).init(params())  # (TraceState, ScaleByLearningRateState)
    with pytest.raises(optim.StateMismatchError, match=r"opt_state\[0\]: scale_by_adam .* got TraceState") as e:
        optim.adam().update(grads(), sgd_state, params())
    assert isinstance(e.value, lf.StepError) and e.value.path == (0,)


def test_state_mismatch_inside_multi_transform_names_the_full_path():
    make = lambda inner: optim.multi_transform({"a": inner, "b": optim.set_to_zero()}, {"enc": "a", "head": "b"})  # noqa: E731
    state = make(optim.rmsprop()).init(params())
    with pytest.raises(optim.StateMismatchError, match=r"opt_state\[0\]\['a'\]\[0\]\[0\]: scale_by_adam .* got ScaleByRmsState"):
        make(optim.adam()).update(grads(), state, params())


def test_multi_steps_wrapping_changed():
    state = optim.multi_steps(optim.sgd(0.1), 2).init(params())
    with pytest.raises(optim.StateMismatchError, match=r"opt_state\[2\]: chain of 2 transforms"):
        optim.multi_steps(optim.sgd(0.1, momentum=0.9), 2).update(grads(), state, params())
    with pytest.raises(optim.StateMismatchError, match=r"opt_state: multi_steps expected .* got a tuple of 1 states"):
        optim.multi_steps(optim.sgd(0.1), 2).update(grads(), optim.sgd(0.1).init(params()), params())


def test_amsgrad_setting_changed():
    state = optim.adam(amsgrad=False).init(params())
    with pytest.raises(optim.StateMismatchError, match=r"opt_state\[0\]: scale_by_adam\(amsgrad=True\)"):
        optim.adam(amsgrad=True).update(grads(), state, params())


def test_multi_transform_state_with_other_labels():
    state = optim.multi_transform({"x": optim.sgd(0.1)}, "x").init(params())
    with pytest.raises(optim.StateMismatchError, match=r"labels \['x', 'y'\] but the state has \['x'\]"):
        optim.multi_transform({"x": optim.sgd(0.1), "y": optim.sgd(0.1)}, "x").update(grads(), state, params())


def test_non_tensor_param():
    with pytest.raises(lf.TreeError, match=r"params\['lr_scale'\] is a float"):
        optim.adam().init({"w": torch.ones(2), "lr_scale": 0.5})


def test_integer_param():
    with pytest.raises(lf.TreeError, match=r"params\['steps'\] is a torch.int64 tensor"):
        optim.sgd(0.1, momentum=0.9).init({"w": torch.ones(2), "steps": torch.zeros((), dtype=torch.int64)})


def test_label_without_a_transform_names_the_leaf():
    with pytest.raises(lf.TreeError, match=r"label 'bias' at \['enc'\]\['b'\] has no transform"):
        optim.multi_transform(
            {"w": optim.sgd(0.1)}, {"enc": {"w": "w", "b": "bias"}, "head": "w"}
        ).init(params())


def test_mask_that_does_not_fit_the_params():
    with pytest.raises(lf.TreeError, match=r"\['decoder'\]"):
        optim.masked(optim.sgd(0.1), {"enc": True, "decoder": False}).init(params())


def test_mask_with_a_tensor_leaf():
    with pytest.raises(lf.TreeError, match=r"mask leaf \['head'\] is a Tensor"):
        optim.masked(optim.sgd(0.1), {"enc": True, "head": torch.tensor(True)}).init(params())


def test_weight_decay_without_params():
    opt = optim.adamw()
    with pytest.raises(lf.StepError, match="needs the params"):
        opt.update(grads(), opt.init(params()))


def test_current_lr_with_several_learning_rates():
    opt = optim.multi_transform({"a": optim.sgd(0.1), "b": optim.sgd(0.2)}, {"enc": "a", "head": "b"})
    with pytest.raises(lf.TreeError, match=r"\[0\]\['a'\]\[0\]\[0\].*learning_rates"):
        optim.current_lr(opt.init(params()))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: optim.sgd(-0.1), "learning rate"),
        (lambda: optim.sgd(0.1, nesterov=True), "Nesterov"),
        (lambda: optim.adam(betas=(0.9, 1.0)), "beta parameter at index 1"),
        (lambda: optim.adam(b1=-0.1), "beta parameter at index 0"),
        (lambda: optim.rmsprop(eps=-1.0), "epsilon"),
        (lambda: optim.adagrad(lr_decay=-1.0), "lr_decay"),
        (lambda: optim.clip_by_global_norm(0.0), "max_norm"),
    ],
)
def test_invalid_hyperparameters(make, match):
    with pytest.raises(optim.OptimizerConfigError, match=match) as e:
        make()
    assert isinstance(e.value, lf.LightfnError) and isinstance(e.value, ValueError)


def test_chain_of_a_non_transform():
    with pytest.raises(lf.StepError, match="argument 1 is a function"):
        optim.chain(optim.sgd(0.1), lambda g: g)


def _torch_optimizer():
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize(
    "lr, named",
    [
        (torch.optim.lr_scheduler.OneCycleLR, "the class torch.optim.lr_scheduler.OneCycleLR"),
        (torch.optim.lr_scheduler.StepLR(_torch_optimizer(), 3), "a StepLR"),
        (lambda step, other: 0.1, "does not take the step count"),
        ("1e-3", "a str"),
        (torch.ones(2), r"shape \(2,\)"),
        (None, "a NoneType"),
    ],
)
def test_a_learning_rate_that_is_not_a_schedule_is_refused_when_the_optimizer_is_built(lr, named):
    # OneCycleLR used to be accepted and failed at the first step, inside update.
    for make, who in ((optim.adam, "adam"), (optim.sgd, "sgd"), (optim.scale_by_learning_rate, "scale_by_learning_rate")):
        with pytest.raises(optim.OptimizerConfigError, match=named) as e:
            make(lr)
        msg = str(e.value)
        assert msg.startswith(who + ":") and "a function step -> lr" in msg
        if "lr_scheduler" in named or "StepLR" in named:
            assert "lf.optim.onecycle" in msg


def test_schedules_and_scalars_are_accepted():
    import functools

    for lr in (0.1, 1, torch.tensor(0.1), lambda step: 0.1 * 0.9**step, optim.onecycle(0.1, 10),
               functools.partial(lambda step, base: base, base=0.1)):
        opt = optim.adam(lr)
        opt.update(grads(), opt.init(params()), params())
