"""inject_hyperparams: hyperparameters as state tensors; a stacked sweep equals separate runs."""

import pytest
import torch

import lightfn as lf
from lightfn import optim

D = torch.float64


def loss_fn(p, batch):
    x, y = batch
    return ((torch.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2).mean()


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(3, 6, generator=g, dtype=D), "w2": torch.randn(6, 1, generator=g, dtype=D)}


def batches(n=6):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, generator=g, dtype=D)
        out.append((x, x.sum(1, keepdim=True).sin()))
    return out


def close(a, b, rtol=1e-9):
    for (path, x), y in zip(lf.tree.leaves_with_path(a), lf.tree.leaves(b)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-15, msg=lambda m: f"{lf.tree.keystr(path)}: {m}")


def sweep(make_injected, make_plain, values, name):
    """Train one ensemble over ``values`` of hyperparameter ``name``; compare each member alone."""
    members = []
    for v in values:
        opt = make_injected(v)
        members.append(lf.TrainState.create(params=params(), optimizer=opt, seed=0))
    # One step function serves every member: the values come from the state.
    step = lf.ensemble(lf.train_step(loss_fn, make_injected(values[0])))
    state = lf.tree.stack(members)
    for b in batches():
        state, _ = step(state, b)
    assert state.opt_state.hyperparams[name].tolist() == pytest.approx(list(values))
    for i, v in enumerate(values):
        opt = make_plain(v)
        alone = lf.TrainState.create(params=params(), optimizer=opt, seed=0)
        plain_step = lf.train_step(loss_fn, opt)
        for b in batches():
            alone, _ = plain_step(alone, b)
        close(alone.params, lf.tree.unstack(state)[i].params)


def test_adam_learning_rate_sweep_in_one_ensemble_step_equals_each_rate_alone():
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    sweep(lambda v: optim.inject_hyperparams(optim.adam)(lr=v), lambda v: optim.adam(lr=v), lrs, "lr")


def test_sgd_rate_sweep_with_momentum_kept_static():
    make = optim.inject_hyperparams(optim.sgd, static_args=("momentum",))
    sweep(lambda v: make(v, momentum=0.9), lambda v: optim.sgd(v, momentum=0.9), [0.01, 0.05, 0.1], "lr")


def test_weight_decay_and_momentum_sweep_through_a_transform_factory():
    def sgdw(lr, weight_decay, momentum):
        return optim.chain(optim.add_decayed_weights(weight_decay), optim.trace(momentum), optim.scale_by_learning_rate(lr))

    make = optim.inject_hyperparams(sgdw)
    sweep(lambda v: make(0.05, weight_decay=v, momentum=0.5), lambda v: optim.sgd(0.05, momentum=0.5, weight_decay=v),
          [0.0, 1e-2, 1e-1], "weight_decay")
    sweep(lambda v: make(0.05, weight_decay=1e-3, momentum=v), lambda v: optim.sgd(0.05, momentum=v, weight_decay=1e-3),
          [0.1, 0.5, 0.9], "momentum")


def test_injected_state_matches_plain_optimizer_arithmetic_and_records_values():
    p = params()
    inj = optim.inject_hyperparams(optim.adamw)(lr=2e-3, weight_decay=0.1)
    plain = optim.adamw(lr=2e-3, weight_decay=0.1)
    si, sp = inj.init(p), plain.init(p)
    assert si.hyperparams["lr"].dtype == D and float(si.hyperparams["weight_decay"]) == 0.1
    g = lf.tree.map(torch.ones_like, p)
    for _ in range(3):
        ui, si = inj.update(g, si, p)
        up, sp = plain.update(g, sp, p)
        close(up, ui, rtol=1e-12)
    assert int(si.count) == 3
    # the rate stays readable by current_lr / LearningRateMonitor
    assert float(optim.current_lr(si)) == pytest.approx(2e-3)
    assert list(optim.learning_rates(si)) == ["[2][2]"]  # inner_state, third transform


def test_a_schedule_can_be_injected_and_its_value_is_recorded():
    sched = optim.linear_schedule(0.1, 0.0, 4)
    inj = optim.inject_hyperparams(optim.sgd)(lr=sched)
    plain = optim.sgd(sched)
    p = params()
    si, sp = inj.init(p), plain.init(p)
    g = lf.tree.map(torch.ones_like, p)
    for k in range(3):
        ui, si = inj.update(g, si, p)
        up, sp = plain.update(g, sp, p)
        close(up, ui, rtol=1e-12)
        assert float(si.hyperparams["lr"]) == pytest.approx(0.1 * (1 - k / 4))


def test_errors_name_the_problem():
    make = optim.inject_hyperparams(optim.sgd)
    with pytest.raises(optim.OptimizerConfigError):
        make(lr=-1.0)
    with pytest.raises(lf.StepError, match="unexpected keyword"):
        make(learning_rate=0.1)
    with pytest.raises(optim.StateMismatchError, match="inject_hyperparams"):
        make(0.1).update({"w": torch.ones(1)}, optim.sgd(0.1).init({"w": torch.ones(1)}))
    # sgd branches on momentum as a Python number: injecting it fails clearly when vmapped.
    opt = make(0.1, momentum=0.9)
    members = [lf.TrainState.create(params=params(), optimizer=opt, seed=s) for s in range(2)]
    with pytest.raises(lf.StepError, match=r"cannot take \['lr', 'momentum'\] as tensors.*static_args"):
        lf.ensemble(lf.train_step(loss_fn, opt))(lf.tree.stack(members), batches(1)[0])

