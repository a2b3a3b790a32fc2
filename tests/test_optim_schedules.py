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
