import pytest
import torch
import torch.nn as nn

import lightfn as lf


def test_functionalize_matches_module_and_params_are_detached_copies():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    apply, params = lf.functionalize(m)
    x = torch.randn(5, 4)
    torch.testing.assert_close(apply(params, x), m(x))
    assert sorted(params) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert not params["0.weight"].requires_grad
    params["0.weight"].zero_()
    assert m[0].weight.abs().sum() > 0  # the module keeps its own weights
    new = {k: torch.zeros_like(v) for k, v in params.items()}
    assert apply(new, x).abs().sum() == 0


def test_tied_weights_appear_once_and_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, i):
            return self.out(self.emb(i))

    m = Tied()
    apply, params = lf.functionalize(m)
    assert list(params) == ["emb.weight"]
    i = torch.tensor([1, 2])
    torch.testing.assert_close(apply(params, i), m(i))
    g = lf.grad(lambda p: apply(p, i).sum())(params)
    m(i).sum().backward()
    torch.testing.assert_close(g["emb.weight"], m.emb.weight.grad)


def test_batchnorm_needs_explicit_state_and_train_flag():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(lf.StepError, match="with_state=True"):
        lf.functionalize(m)
    apply, params, buffers = lf.functionalize(m, with_state=True)
    x = torch.randn(16, 3)
    before = {k: v.clone() for k, v in buffers.items()}
    y, new_buffers = apply(params, buffers, x)
    torch.testing.assert_close(y, m(x))  # m updates its own stats in train mode
    for k in buffers:
        assert torch.equal(buffers[k], before[k])  # inputs untouched
    torch.testing.assert_close(new_buffers["1.running_mean"], m[1].running_mean)
    assert new_buffers["1.num_batches_tracked"].item() == 1
    m.eval()
    y_eval, same = apply(params, new_buffers, x, train=False)
    torch.testing.assert_close(y_eval, m(x))
    assert same["1.running_mean"] is new_buffers["1.running_mean"]
    assert m.training is False  # functionalize never switched the caller's module


def test_eval_mode_module_uses_buffers_as_constants_and_dropout_flag():
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).eval()
    apply, params = lf.functionalize(m)
    x = torch.randn(4, 3)
    torch.testing.assert_close(apply(params, x), m(x))
    with pytest.raises(lf.StepError, match="with_state=True"):
        apply(params, x, train=True)


def test_wrong_params_keys_are_named():
    apply, params = lf.functionalize(nn.Linear(2, 2))
    with pytest.raises(lf.StepError, match=r"missing \['bias'\]; unexpected \['b'\]"):
        apply({"weight": params["weight"], "b": params["bias"]}, torch.ones(1, 2))


def test_not_a_module():
    with pytest.raises(lf.StepError, match="nn.Module"):
        lf.functionalize(lambda x: x)


class _WithTrainArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, train=False):  # its own flag, unrelated to nn.Module's mode
        return self.lin(x) * (2.0 if train else 1.0)


def test_forward_with_its_own_train_parameter_is_refused_not_swallowed():
    # apply(p, x, train=True) used to take train= for itself: forward never saw it.
    m = _WithTrainArg()
    with pytest.raises(lf.StepError, match=r"_WithTrainArg.forward has its own 'train' parameter.*mode_keyword='training_mode'"):
        lf.functionalize(m)
    with pytest.raises(lf.StepError, match="own 'train' parameter"):
        lf.functionalize(m, with_state=True)


def test_mode_keyword_renames_the_switch_and_passes_train_through():
    m = _WithTrainArg().train()
    apply, params = lf.functionalize(m, mode_keyword="training_mode")
    x = torch.randn(2, 3)
    torch.testing.assert_close(apply(params, x, train=True), m(x, train=True))
    torch.testing.assert_close(apply(params, x), m(x))
    torch.testing.assert_close(apply(params, x, train=True, training_mode=False), m(x, train=True))
    # the renamed switch still switches the mode
    d = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.99)).train()
    apply_d, pd = lf.functionalize(d, mode_keyword="training_mode")
    torch.testing.assert_close(apply_d(pd, x, training_mode=False), d.eval()(x))
    with pytest.raises(lf.StepError, match="mode_keyword"):
        lf.functionalize(d, mode_keyword="not a name")


class _Shared(nn.Module):
    """Tied weights, a submodule used twice and a buffer: every kind of slot apply fills."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.block = nn.Linear(4, 4)
        self.again = self.block  # one module under two names
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("shift", torch.full((4,), 0.5))
        self.fail = False

    def forward(self, i):
        if self.fail:
            raise RuntimeError("forward failed")
        return self.out(self.again(self.block(self.emb(i))) + self.shift)


def test_eager_apply_swaps_like_functional_call_and_keeps_no_tensor():
    import gc
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class Traced(TorchDispatchMode):  # not plain eager: apply takes torch's functional_call
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    m = _Shared()
    apply, params = lf.functionalize(m)
    assert sorted(params) == ["block.bias", "block.weight", "emb.weight"]
    i = torch.tensor([[1, 2, 3]])
    new = {k: torch.randn_like(v) for k, v in params.items()}
    fast = apply(new, i)
    with Traced():
        slow = apply(new, i)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(apply(params, i), m(i))
    g = lf.grad(lambda p: apply(p, i).square().sum())(params)
    m(i).square().sum().backward()
    torch.testing.assert_close(g["emb.weight"], m.emb.weight.grad)  # both uses of the tied weight
    torch.testing.assert_close(g["block.weight"], m.block.weight.grad)

    # the skeleton lets go of the caller's tensors, also when forward raises
    failing = _Shared()
    failing.fail = True
    apply_failing, p_failing = lf.functionalize(failing)
    refs = [weakref.ref(t) for t in new.values()]
    gone = {k: torch.randn_like(v) for k, v in p_failing.items()}
    gone_refs = [weakref.ref(t) for t in gone.values()]
    with pytest.raises(RuntimeError, match="forward failed"):
        apply_failing(gone, i)
    del new, fast, slow, gone
    gc.collect()
    assert all(r() is None for r in refs + gone_refs)
