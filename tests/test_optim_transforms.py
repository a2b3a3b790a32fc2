"""lf.optim building blocks: chain, masking, multi_transform, multi_steps, purity, dtypes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightfn as lf
from lightfn import optim


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {
        "enc": {"w": torch.randn(4, 3, generator=g, dtype=dtype), "b": torch.randn(4, generator=g, dtype=dtype)},
        "head": {"w": torch.randn(2, 4, generator=g, dtype=dtype), "b": torch.randn(2, generator=g, dtype=dtype)},
    }


def make_grads(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [lf.tree.map(lambda p: torch.randn(p.shape, generator=g, dtype=dtype), make_params(dtype)) for _ in range(n)]


def assert_trees_equal(a, b, *, exact=True, rtol=1e-12):
    lf.tree.assert_same_structure(a, b, check_shapes=True)
    for x, y in zip(lf.tree.leaves(a), lf.tree.leaves(b)):
        if exact:
            assert torch.equal(x, y), (x, y)
        else:
            torch.testing.assert_close(x, y, rtol=rtol, atol=1e-15)


def clone(tree):
    return lf.tree.map(lambda x: x.clone(), tree)


# ----------------------------------------------------------------------------- chain


def test_chain_equals_transforms_applied_by_hand():
    parts = [
        optim.clip_by_global_norm(1.0),
        optim.scale_by_adam(b1=0.8),
        optim.add_decayed_weights(1e-2),
        optim.scale_by_learning_rate(optim.exponential_decay(1e-2, 3, 0.5)),
    ]
    opt = optim.chain(*parts)
    params = make_params()
    state = opt.init(params)
    by_hand_params = clone(params)
    by_hand_states = [t.init(params) for t in parts]
    assert type(state) is tuple and len(state) == 4
    for grads in make_grads(6):
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        u = grads
        for i, t in enumerate(parts):
            u, by_hand_states[i] = t.update(u, by_hand_states[i], by_hand_params)
        by_hand_params = optim.apply_updates(by_hand_params, u)
        assert_trees_equal(params, by_hand_params)
    assert_trees_equal(state, tuple(by_hand_states))
    assert state[1].count.item() == 6


def test_identity_and_empty_chain_pass_updates_through():
    params = make_params()
    grads = make_grads(1)[0]
    for opt in (optim.identity(), optim.chain()):
        updates, _ = opt.update(grads, opt.init(params), params)
        assert_trees_equal(updates, grads)


def test_scale_and_scale_by_learning_rate_signs():
    params = {"w": torch.ones(3)}
    grads = {"w": torch.full((3,), 2.0)}
    u, _ = optim.scale(0.5).update(grads, optim.scale(0.5).init(params))
    assert torch.equal(u["w"], torch.full((3,), 1.0))
    t = optim.scale_by_learning_rate(0.1)
    u, s = t.update(grads, t.init(params))
    assert torch.allclose(u["w"], torch.full((3,), -0.2))
    t = optim.scale_by_schedule(optim.linear_schedule(1.0, 0.0, 4))
    s = t.init(params)
    for expected in [1.0, 0.75, 0.5]:
        u, s = t.update(grads, s)
        assert torch.allclose(u["w"], torch.full((3,), 2.0 * expected))


# ----------------------------------------------------------------------------- purity and dtypes


@pytest.mark.parametrize(
    "opt",
    [
        optim.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=0.1),
        optim.adam(1e-2, weight_decay=0.1, amsgrad=True),
        optim.adamw(optim.cosine_decay(1e-2, 10)),
        optim.rmsprop(1e-2, momentum=0.9, centered=True),
        optim.adagrad(1e-2, lr_decay=0.1),
        optim.lion(1e-3, weight_decay=0.1),
        optim.multi_steps(optim.adam(1e-2), 2),
        optim.multi_transform({"a": optim.adam(1e-2), "b": optim.set_to_zero()}, {"enc": "a", "head": "b"}),
    ],
    ids=["sgd", "adam", "adamw", "rmsprop", "adagrad", "lion", "multi_steps", "multi_transform"],
)
def test_update_never_mutates_its_inputs(opt):
    params = make_params()
    state = opt.init(params)
    for grads in make_grads(3):
        before = clone((grads, state, params))
        updates, new_state = opt.update(grads, state, params)
        assert_trees_equal((grads, state, params), before)
        new_params = optim.apply_updates(params, updates)
        assert_trees_equal(params, before[2])
        state, params = new_state, new_params


def test_states_are_namedtuples_counters_int64_moments_param_dtype():
    params = make_params(torch.bfloat16)
    opt = optim.adam(1e-2)
    state = opt.init(params)
    adam_state, lr_state = state
    assert isinstance(adam_state, optim.ScaleByAdamState) and isinstance(lr_state, optim.ScaleByLearningRateState)
    for s in (adam_state, lr_state):
        assert s.count.dtype == torch.int64 and s.count.shape == () and s.count.device == params["enc"]["w"].device
    for m in lf.tree.leaves((adam_state.mu, adam_state.nu)):
        assert m.dtype == torch.bfloat16
    updates, state = opt.update(make_grads(1, torch.bfloat16)[0], state, params)
    new = optim.apply_updates(params, updates)
    assert all(x.dtype == torch.bfloat16 for x in lf.tree.leaves(new))
    assert state[0].count.item() == 1 and state[1].count.item() == 1


def test_apply_updates_keeps_param_dtype_with_wider_updates():
    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    out = optim.apply_updates(params, {"w": torch.full((3,), 0.5, dtype=torch.float32)})
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], torch.full((3,), 1.5, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- masking


def test_masked_applies_inner_only_where_true_and_passes_others_through():
    params = make_params()
    mask = {"enc": {"w": True, "b": False}, "head": False}  # a prefix for "head"
    opt = optim.masked(optim.adam(0.1), mask)
    state = opt.init(params)
    # the inner state only holds the leaves the mask selects
    inner_mu = state.inner_state[0].mu
    assert inner_mu["enc"]["b"] is None and inner_mu["head"] == {"b": None, "w": None}
    assert inner_mu["enc"]["w"].shape == (4, 3)
    ref = optim.adam(0.1)
    ref_state = ref.init({"w": params["enc"]["w"]})
    for grads in make_grads(4):
        updates, state = opt.update(grads, state, params)
        assert torch.equal(updates["enc"]["b"], grads["enc"]["b"])
        assert_trees_equal(updates["head"], grads["head"])
        ref_u, ref_state = ref.update({"w": grads["enc"]["w"]}, ref_state, {"w": params["enc"]["w"]})
        assert torch.equal(updates["enc"]["w"], ref_u["w"])
        params = optim.apply_updates(params, updates)


def test_masked_with_callable_mask_exempts_biases_from_weight_decay():
    params = make_params()
    grads = lf.tree.zeros_like(params)
    opt = optim.add_decayed_weights(0.5, mask=lambda p: lf.tree.map(lambda x: x.ndim > 1, p))
    updates, _ = opt.update(grads, opt.init(params), params)
    assert torch.equal(updates["enc"]["w"], 0.5 * params["enc"]["w"])
    assert torch.equal(updates["enc"]["b"], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(updates["head"]["b"], torch.zeros(2, dtype=torch.float64))


def test_multi_transform_freezes_and_uses_per_subtree_learning_rates():
    params = make_params()
    opt = optim.multi_transform(
        {"frozen": optim.set_to_zero(), "fast": optim.sgd(1.0), "slow": optim.sgd(0.01)},
        lambda p: {"enc": {"w": "slow", "b": "frozen"}, "head": "fast"},
    )
    state = opt.init(params)
    start = clone(params)
    grads = make_grads(1)[0]
    updates, state = opt.update(grads, state, params)
    params = optim.apply_updates(params, updates)
    assert torch.equal(params["enc"]["b"], start["enc"]["b"])
    torch.testing.assert_close(params["enc"]["w"], start["enc"]["w"] - 0.01 * grads["enc"]["w"])
    torch.testing.assert_close(params["head"]["w"], start["head"]["w"] - 1.0 * grads["head"]["w"])
    rates = optim.learning_rates(state)
    assert {k: v.item() for k, v in rates.items()} == {"[0]['fast'][0][0]": 1.0, "[0]['slow'][0][0]": 0.01}
    with pytest.raises(lf.TreeError, match="learning_rates"):
        optim.current_lr(state)


# ----------------------------------------------------------------------------- multi_steps


@pytest.mark.parametrize("k", [1, 3])
def test_multi_steps_equals_one_step_on_the_mean_gradient(k):
    params = make_params()
    acc = optim.multi_steps(optim.adam(0.1, weight_decay=0.1), every_k=k)
    ref = optim.adam(0.1, weight_decay=0.1)
    state, ref_state = acc.init(params), ref.init(params)
    ref_params = clone(params)
    grads = make_grads(2 * k)
    for round_ in range(2):
        round_grads = grads[round_ * k : (round_ + 1) * k]
        for i, g in enumerate(round_grads):
            updates, state = acc.update(g, state, params)
            params = optim.apply_updates(params, updates)
            if i < k - 1:  # non-final mini-steps: zero updates, params and inner state untouched
                assert all(torch.count_nonzero(u) == 0 for u in lf.tree.leaves(updates))
                assert state.inner_state[1].count.item() == round_
                assert state.mini_step.item() == i + 1
        mean = lf.tree.map(lambda *gs: sum(gs) / k, *round_grads)
        ref_updates, ref_state = ref.update(mean, ref_state, ref_params)
        ref_params = optim.apply_updates(ref_params, ref_updates)
        assert_trees_equal(params, ref_params, exact=False)
        # the inner count advanced exactly once per k mini-steps
        assert state.inner_state[1].count.item() == round_ + 1 == state.gradient_step.item()
        assert state.mini_step.item() == 0
        assert all(torch.count_nonzero(a) == 0 for a in lf.tree.leaves(state.acc_grads))
    assert_trees_equal(state.inner_state, ref_state, exact=False)
    assert optim.current_lr(state).item() == pytest.approx(0.1)


def test_multi_steps_rejects_bad_every_k():
    with pytest.raises(optim.OptimizerConfigError, match="every_k"):
        optim.multi_steps(optim.sgd(0.1), 0)


class _Functional(TorchDispatchMode):
    """Runs every op unchanged; while active, updates go leaf by leaf (the traced form)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "make", [lambda: optim.adam(1e-2), lambda: optim.adamw(optim.cosine_decay(1e-2, 5), amsgrad=True, eps_root=1e-10),
             lambda: optim.sgd(torch.tensor(0.1), momentum=0.9)],
)
def test_eager_foreach_updates_equal_leaf_by_leaf_bitwise(make, dtype):
    # Plain eager, Adam, the learning rate and apply_updates run as _foreach ops; traced,
    # they go leaf by leaf. The same kernels run per tensor: not one bit may differ.
    opt = make()
    params = lf.tree.cast(make_params(torch.float32), dtype)
    fast_p, fast_s = params, opt.init(params)
    slow_p, slow_s = params, opt.init(params)
    for grads in make_grads(4, torch.float32):
        grads = lf.tree.cast(grads, dtype)
        u, fast_s = opt.update(grads, fast_s, fast_p)
        fast_p = optim.apply_updates(fast_p, u)
        with _Functional():
            u, slow_s = opt.update(grads, slow_s, slow_p)
            slow_p = optim.apply_updates(slow_p, u)
    for a, b in zip(lf.tree.leaves((fast_p, fast_s)), lf.tree.leaves((slow_p, slow_s))):
        assert a.dtype == b.dtype and torch.equal(a, b)
