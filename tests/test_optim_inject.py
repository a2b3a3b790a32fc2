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
    if name is not None:
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
        make(rate=0.1)
    with pytest.raises(optim.StateMismatchError, match="inject_hyperparams"):
        make(0.1).update({"w": torch.ones(1)}, optim.sgd(0.1).init({"w": torch.ones(1)}))
    # a factory of one's own that branches on a value as a Python number fails clearly when vmapped
    def branching(lr, momentum):
        return optim.sgd(lr, momentum=0.9) if momentum else optim.sgd(lr)

    opt = optim.inject_hyperparams(branching)(0.1, momentum=0.9)
    members = [lf.TrainState.create(params=params(), optimizer=opt, seed=s) for s in range(2)]
    with pytest.raises(lf.StepError, match=r"cannot take \['lr', 'momentum'\] as tensors.*static_args"):
        lf.ensemble(lf.train_step(loss_fn, opt))(lf.tree.stack(members), batches(1)[0])


# ----------------------------------------------------------------------------- every alias hyperparameter

ADAMW_MEMBERS = [  # (lr, weight_decay, b1): all three differ across the 4 members
    (1e-3, 0.0, 0.9),
    (3e-3, 1e-2, 0.8),
    (1e-2, 1e-1, 0.95),
    (3e-2, 3e-1, 0.5),
]


def adamw_ensemble(compiled):
    """Train the 4 adamw members as one ensemble; return the stacked state."""
    make = optim.inject_hyperparams(optim.adamw)
    states = [lf.TrainState.create(params=params(i), optimizer=make(lr=lr, weight_decay=wd, b1=b1), seed=i)
              for i, (lr, wd, b1) in enumerate(ADAMW_MEMBERS)]
    step = lf.ensemble(lf.train_step(loss_fn, make(lr=1e-3, weight_decay=0.0, b1=0.9)))
    if compiled:
        step = lf.jit(step)
    state = lf.tree.stack(states)
    for b in batches():
        state, _ = step(state, b)
    return state


def adamw_alone(i):
    lr, wd, b1 = ADAMW_MEMBERS[i]
    opt = optim.adamw(lr, weight_decay=wd, b1=b1)
    state = lf.TrainState.create(params=params(i), optimizer=opt, seed=i)
    step = lf.train_step(loss_fn, opt)
    for b in batches():
        state, _ = step(state, b)
    return state


def test_adamw_sweep_of_lr_weight_decay_and_b1_in_one_ensemble_step_equals_each_member_alone():
    state = adamw_ensemble(compiled=False)
    hyper = state.opt_state.hyperparams
    assert sorted(hyper) == ["b1", "lr", "weight_decay"]
    assert hyper["weight_decay"].tolist() == [wd for _, wd, _ in ADAMW_MEMBERS]
    for i, member in enumerate(lf.tree.unstack(state)):
        close(adamw_alone(i).params, member.params)


@pytest.mark.compile
def test_compiled_adamw_sweep_is_one_graph_and_matches_each_member_alone():
    state = adamw_ensemble(compiled=True)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    for i, member in enumerate(lf.tree.unstack(state)):
        close(adamw_alone(i).params, member.params, rtol=1e-7)


@pytest.mark.parametrize(
    "make_injected, make_plain, value",
    [
        (lambda v: optim.inject_hyperparams(optim.sgd)(0.05, momentum=v, dampening=0.1, weight_decay=v / 10),
         lambda v: optim.sgd(0.05, momentum=v, dampening=0.1, weight_decay=v / 10), 0.7),
        (lambda v: optim.inject_hyperparams(optim.sgd)(0.05, momentum=v, nesterov=True),
         lambda v: optim.sgd(0.05, momentum=v, nesterov=True), 0.9),
        (lambda v: optim.inject_hyperparams(optim.adam)(1e-2, b2=v, eps=1e-6, weight_decay=0.1, amsgrad=True),
         lambda v: optim.adam(1e-2, b2=v, eps=1e-6, weight_decay=0.1, amsgrad=True), 0.99),
        (lambda v: optim.inject_hyperparams(optim.adam)(1e-2, eps_root=v),
         lambda v: optim.adam(1e-2, eps_root=v), 1e-8),
        (lambda v: optim.inject_hyperparams(optim.rmsprop)(1e-2, alpha=v, eps=1e-6, weight_decay=0.01, momentum=0.5),
         lambda v: optim.rmsprop(1e-2, alpha=v, eps=1e-6, weight_decay=0.01, momentum=0.5), 0.9),
        (lambda v: optim.inject_hyperparams(optim.rmsprop)(1e-2, alpha=v, momentum=0.3, centered=True),
         lambda v: optim.rmsprop(1e-2, alpha=v, momentum=0.3, centered=True), 0.8),
        (lambda v: optim.inject_hyperparams(optim.adagrad)(0.1, lr_decay=v, weight_decay=0.01,
                                                          initial_accumulator_value=0.1, eps=1e-8),
         lambda v: optim.adagrad(0.1, lr_decay=v, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-8), 0.05),
        (lambda v: optim.inject_hyperparams(optim.lion)(1e-3, b1=v, b2=0.95, weight_decay=0.1),
         lambda v: optim.lion(1e-3, b1=v, b2=0.95, weight_decay=0.1), 0.8),
    ],
    ids=["sgd", "sgd_nesterov", "adam_amsgrad", "adam_eps_root", "rmsprop", "rmsprop_centered", "adagrad", "lion"],
)
def test_every_numeric_alias_argument_is_injectable_and_exact(make_injected, make_plain, value):
    """Each alias with all its numeric arguments in the state: a float injected gives the
    plain optimizer's numbers (eager), and a sweep over the first one stacks and trains."""
    p = params()
    inj, plain = make_injected(value), make_plain(value)
    si, sp = inj.init(p), plain.init(p)
    g = lf.tree.map(torch.ones_like, p)
    for k in range(3):
        g = lf.tree.map(lambda x: x * (1.0 + 0.5 * k), g)
        ui, si = inj.update(g, si, p)
        up, sp = plain.update(g, sp, p)
        close(up, ui, rtol=1e-12)
    sweep(make_injected, make_plain, [value, value * 0.5], None)


def test_any_hyperparameter_can_be_a_schedule():
    # weight decay 0.05, 0.15, 0.25 on updates 0, 1, 2: each update equals adamw built with
    # that value, stepping the same state
    p = params()
    inj = optim.inject_hyperparams(optim.adamw)(lr=1e-2, weight_decay=optim.linear_schedule(0.05, 0.35, 3), b1=0.8)
    si = inj.init(p)
    sp = optim.adamw(1e-2, weight_decay=0.05, b1=0.8).init(p)
    g = lf.tree.map(torch.ones_like, p)
    for k in range(3):
        ui, si = inj.update(g, si, p)
        up, sp = optim.adamw(1e-2, weight_decay=0.05 + 0.1 * k, b1=0.8).update(g, sp, p)
        close(up, ui, rtol=1e-12)
        assert float(si.hyperparams["weight_decay"]) == pytest.approx(0.05 + 0.1 * k)


def test_a_hyperparameter_of_the_wrong_shape_is_refused_naming_it():
    make = optim.inject_hyperparams(optim.adamw)
    with pytest.raises(optim.OptimizerConfigError, match=r"'weight_decay' \(as given\) has shape \(4,\).*lf.tree.stack"):
        make(lr=1e-3, weight_decay=torch.full((4,), 0.1, dtype=D))
    with pytest.raises(optim.OptimizerConfigError, match=r"adamw: b1 \(betas\[0\]\) must be a number or a 0-d"):
        optim.adamw(1e-3, b1=torch.tensor([0.9, 0.8]))
    with pytest.raises(optim.OptimizerConfigError, match=r"sgd: momentum must be a number or a 0-d"):
        optim.sgd(0.1, momentum=torch.ones(1, 1))
    # a stacked state run without lf.ensemble: the stored value has the member axis
    opt = make(lr=1e-3, weight_decay=0.1)
    stacked = lf.tree.stack([lf.TrainState.create(params=params(), optimizer=opt, seed=s) for s in range(2)])
    g = lf.tree.map(torch.ones_like, stacked.params)
    with pytest.raises(optim.OptimizerConfigError, match=r"'lr' \(in opt_state.hyperparams\['lr'\]\) has shape \(2,\).*lf.ensemble"):
        opt.update(g, stacked.opt_state, stacked.params)
    # a schedule returning a vector
    with pytest.raises(optim.OptimizerConfigError, match=r"'lr' \(the value its schedule returned\) has shape \(3,\)"):
        optim.inject_hyperparams(optim.sgd)(lr=lambda count: torch.full((3,), 0.1, dtype=D))


def test_learning_rate_is_optax_spelling_of_lr():
    # DESIGN.md's form: inject_hyperparams(lf.optim.adam)(learning_rate=1e-3)
    params = {"w": torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)}
    grads = {"w": torch.linspace(0.5, -0.3, 5, dtype=torch.float64)}
    injected = optim.inject_hyperparams(optim.adam)(learning_rate=1e-3)
    state = injected.init(params)
    assert set(state.hyperparams) == {"learning_rate"}
    plain = optim.adam(lr=1e-3)
    ps = plain.init(params)
    for _ in range(3):
        ui, state = injected.update(grads, state, params)
        up, ps = plain.update(grads, ps, params)
        assert torch.allclose(ui["w"], up["w"], rtol=1e-12, atol=0)
    for alias in (optim.sgd, optim.adam, optim.adamw, optim.rmsprop, optim.adagrad, optim.lion):
        a, b = alias(learning_rate=0.05), alias(0.05)
        sa, sb = a.init(params), b.init(params)
        assert torch.equal(a.update(grads, sa, params)[0]["w"], b.update(grads, sb, params)[0]["w"])
        with pytest.raises(optim.OptimizerConfigError, match="not both"):
            alias(0.05, learning_rate=0.1)
