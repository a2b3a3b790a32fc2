"""Schedules against hand-computed values, and reading the learning rate back from a state."""

from __future__ import annotations

import math

import pytest
import torch

from lightfn import optim


def check(schedule, expected: dict[int, float]):
    for step, want in expected.items():
        got = schedule(step)
        assert isinstance(got, float), type(got)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (step, got, want)
        # a tensor count (what optimizers pass) gives the same value as a 0-d float64 tensor
        t = schedule(torch.tensor(step, dtype=torch.int64))
        assert isinstance(t, torch.Tensor) and t.shape == () and t.dtype == torch.float64
        assert t.item() == pytest.approx(want, rel=1e-12, abs=1e-15), (step, t, want)


def test_constant_schedule():
    check(optim.constant_schedule(0.3), {0: 0.3, 7: 0.3, 10_000: 0.3})


def test_linear_schedule_with_transition_begin():
    check(optim.linear_schedule(1.0, 0.0, 10, transition_begin=5), {0: 1.0, 5: 1.0, 10: 0.5, 12: 0.3, 15: 0.0, 99: 0.0})


def test_polynomial_schedule():
    check(optim.polynomial_schedule(1.0, 0.2, power=2, transition_steps=4), {0: 1.0, 2: 0.4, 4: 0.2, 9: 0.2})


def test_cosine_decay_schedule():
    # step 25 of 100: 0.9 * 0.5 * (1 + cos(pi/4)) + 0.1
    check(
        optim.cosine_decay_schedule(1.0, 100, alpha=0.1),
        {0: 1.0, 25: 0.8681980515339464, 50: 0.55, 100: 0.1, 200: 0.1},
    )
    check(optim.cosine_decay(2.0, 10), {0: 2.0, 5: 1.0, 10: 0.0})
    check(optim.cosine_decay_schedule(1.0, 10, exponent=2.0), {5: 0.25})


def test_exponential_decay():
    check(optim.exponential_decay(1.0, 10, 0.5), {0: 1.0, 5: math.sqrt(0.5), 10: 0.5, 20: 0.25})
    check(optim.exponential_decay(1.0, 10, 0.5, staircase=True), {9: 1.0, 15: 0.5, 29: 0.25})
    check(optim.exponential_decay(1.0, 10, 0.5, transition_begin=5), {0: 1.0, 3: 1.0, 15: 0.5})
    check(optim.exponential_decay(1.0, 10, 0.5, end_value=0.3), {10: 0.5, 100: 0.3})
    check(optim.exponential_decay(1.0, 10, 2.0, end_value=3.0), {10: 2.0, 100: 3.0})


def test_piecewise_constant_schedule():
    check(optim.piecewise_constant_schedule(1.0, {20: 0.5, 10: 0.1}), {0: 1.0, 9: 1.0, 10: 0.1, 19: 0.1, 20: 0.05, 50: 0.05})


def test_join_schedules_restarts_the_count_at_each_boundary():
    sched = optim.join_schedules([optim.constant_schedule(2.0), optim.linear_schedule(1.0, 0.0, 10)], [5])
    check(sched, {0: 2.0, 4: 2.0, 5: 1.0, 10: 0.5, 15: 0.0, 30: 0.0})


def test_warmup_cosine_decay_schedule():
    sched = optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110, end_value=0.1)
    check(sched, {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 500: 0.1})


def test_bad_schedule_configs_raise():
    with pytest.raises(optim.OptimizerConfigError, match="decay_steps"):
        optim.cosine_decay_schedule(1.0, 0)
    with pytest.raises(optim.OptimizerConfigError, match="boundaries"):
        optim.join_schedules([optim.constant_schedule(1.0)], [3])
    with pytest.raises(optim.OptimizerConfigError, match="decay_steps"):
        optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=10)


# ----------------------------------------------------------------------------- readers


def test_current_lr_reports_the_schedule_value_of_each_update():
    sched = optim.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=4, decay_steps=20)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched))
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    assert optim.current_lr(state).item() == pytest.approx(sched(0), abs=1e-15)  # the rate the first update will use
    for n in range(25):
        updates, state = opt.update({"w": torch.full((3,), 0.1)}, state, params)
        lr = optim.current_lr(state)
        assert lr.shape == () and lr.item() == pytest.approx(sched(n), rel=1e-12, abs=1e-15)
    assert list(optim.learning_rates(state)) == ["[1][2]"]


def test_current_lr_of_adagrad_includes_lr_decay():
    opt = optim.adagrad(0.1, lr_decay=0.5)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    for step in range(1, 4):
        _, state = opt.update({"w": torch.ones(2)}, state, params)
        assert optim.current_lr(state).item() == pytest.approx(0.1 / (1 + (step - 1) * 0.5))


def test_current_lr_is_none_without_a_learning_rate():
    opt = optim.chain(optim.clip(1.0), optim.scale(-0.1))
    assert optim.current_lr(opt.init({"w": torch.ones(2)})) is None
    assert optim.learning_rates(opt.init({"w": torch.ones(2)})) == {}


def test_current_lr_follows_a_changed_constant_learning_rate_after_resume():
    params = {"w": torch.ones(2)}
    old_state = optim.sgd(0.5).init(params)  # e.g. restored from a checkpoint of a run with lr=0.5
    updates, state = optim.sgd(0.1).update({"w": torch.ones(2)}, old_state, params)
    assert torch.equal(updates["w"], torch.full((2,), -0.1))
    assert optim.current_lr(state).item() == 0.1
    # readers work on any pytree holding the state, keyed by the full path
    assert {k: v.item() for k, v in optim.learning_rates({"opt_state": state}).items()} == {"['opt_state'][0]": 0.1}


def _torch_lrs(make, steps, lr):
    """The learning rate torch uses for each of ``steps`` updates."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("total", [7, 100, 1000])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"three_phase": True},
        {"anneal_strategy": "linear"},
        {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0, "three_phase": True, "anneal_strategy": "linear"},
        {"pct_start": 0.05},  # shorter than one step: no warmup phase
    ],
)
def test_onecycle_equals_torch_at_every_step(total, kw):
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.5, total_steps=total, **kw), total, 0.1)
    schedule = optim.onecycle(0.5, total, **kw)
    got = schedule(torch.arange(total))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)
    assert schedule(total - 1) == pytest.approx(ref[-1], abs=1e-12)
    assert schedule(total + 50) == schedule(total - 1)  # held after the last step (torch raises)


@pytest.mark.parametrize("warmup, total, start_factor, end_lr", [(10, 100, 1 / 3, 0.0), (5, 1000, 0.01, 1e-4), (1, 2, 0.5, 0.0)])
def test_linear_warmup_cosine_decay_equals_torch_sequential_linear_then_cosine(warmup, total, start_factor, end_lr):
    S = torch.optim.lr_scheduler

    def make(o):
        return S.SequentialLR(o, [S.LinearLR(o, start_factor, 1.0, warmup), S.CosineAnnealingLR(o, total - warmup, end_lr)], [warmup])

    ref = _torch_lrs(make, total, 0.3)
    schedule = optim.linear_warmup_cosine_decay(0.3, warmup, total, start_factor=start_factor, end_lr=end_lr)
    torch.testing.assert_close(schedule(torch.arange(total)), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)
    assert schedule(total) == pytest.approx(end_lr, abs=1e-15) and schedule(5 * total) == schedule(total)


def test_sgd_with_onecycle_trains_like_torch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    opt = optim.sgd(optim.onecycle(0.1, 20), momentum=0.9)
    params = {"w": torch.zeros(4, dtype=torch.float64)}
    state = opt.init(params)
    ref = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    topt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(topt, 0.1, total_steps=20, cycle_momentum=False)
    for _ in range(20):
        grads = {"w": 2 * x.T @ (x @ params["w"] - y) / 32}
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        topt.zero_grad()
        ((x @ ref - y) ** 2).mean().backward()
        topt.step()
        sched.step()
    torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim.onecycle(0.1, 0), "total_steps"),
        (lambda: optim.onecycle(0.1, 10, pct_start=1.5), "pct_start"),
        (lambda: optim.onecycle(0.1, 10, anneal_strategy="cosine"), "anneal_strategy"),
        (lambda: optim.onecycle(0.1, 10, pct_start=0.1), "phase 1 .* no length"),
        (lambda: optim.linear_warmup_cosine_decay(0.1, 10, 10), "warmup_steps < total_steps"),
        (lambda: optim.linear_warmup_cosine_decay(0.1, 1, 10, start_factor=2.0), "start_factor"),
    ],
)
def test_bad_onecycle_and_warmup_cosine_configs(make, match):
    with pytest.raises(optim.OptimizerConfigError, match=match):
        make()
