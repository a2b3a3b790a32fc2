"""Meta-gradients: lightfn's nested transforms differentiate through inner optimizer steps.

The MAML meta-gradient computed the lightfn way (``lf.grad`` of a loss after inner
``lf.optim.sgd`` updates, each taken with ``lf.grad``; as ``examples/maml_sine.py`` does)
must equal the one torch's autograd gives for the same unrolled SGD written with
``torch.autograd.grad(..., create_graph=True)``, in float64, to 1e-12.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from torch import nn

import lightfn as lf

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import maml_sine  # noqa: E402

sys.path.remove(str(EXAMPLES))

ALPHA = 0.01


def _model_and_tasks(n_tasks: int = 4):
    torch.manual_seed(0)
    module = maml_sine.mlp().double()
    apply, params = lf.functionalize(module)
    tasks = maml_sine.sine_tasks(n_tasks, 10, 10, seed=3, dtype=torch.float64)
    return module, apply, params, tasks


def _autograd_meta_grad(module: nn.Module, tasks, steps: int, alpha: float) -> dict[str, torch.Tensor]:
    """The reference: unrolled SGD with create_graph=True, one task at a time, on leaf tensors."""
    names = [n for n, _ in module.named_parameters()]
    leaves = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    total = 0.0
    for xs, ys, xq, yq in zip(*tasks):
        fast = list(leaves)
        for _ in range(steps):
            support = (torch.func.functional_call(module, dict(zip(names, fast)), (xs,)) - ys).square().mean()
            grads = torch.autograd.grad(support, fast, create_graph=True)
            fast = [w - alpha * g for w, g in zip(fast, grads)]
        total = total + (torch.func.functional_call(module, dict(zip(names, fast)), (xq,)) - yq).square().mean()
    meta = total / len(tasks[0])
    return dict(zip(names, torch.autograd.grad(meta, leaves)))


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_meta_gradient_matches_autograd_create_graph(steps):
    module, apply, params, tasks = _model_and_tasks()
    expected = _autograd_meta_grad(module, tasks, steps, ALPHA)
    got = lf.grad(lambda p: maml_sine.maml_loss(apply, p, tasks, steps=steps, alpha=ALPHA))(params)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_meta_gradient_is_second_order():
    # first-order MAML (inner gradients treated as constants) differs: the test above can fail
    module, apply, params, tasks = _model_and_tasks()
    full = lf.grad(lambda p: maml_sine.maml_loss(apply, p, tasks, steps=1, alpha=0.5))(params)

    def first_order(p):
        def one(xs, ys, xq, yq):
            g = lf.tree.map(torch.Tensor.detach, lf.grad(lambda q: maml_sine.mse(apply, q, xs, ys))(p))
            return maml_sine.mse(apply, lf.tree.map(lambda w, d: w - 0.5 * d, p, g), xq, yq)

        return lf.vmap(one)(*tasks).mean()

    approx = lf.grad(first_order)(params)
    gap = max(float((full[k] - approx[k]).abs().max()) for k in full)
    assert gap > 1e-6


def test_adapt_takes_sgd_steps():
    # adapt() is plain SGD: one step equals params - alpha * grad of the support loss
    _, apply, params, tasks = _model_and_tasks(1)
    xs, ys = tasks[0][0], tasks[1][0]
    g = lf.grad(lambda p: maml_sine.mse(apply, p, xs, ys))(params)
    one = maml_sine.adapt(apply, params, xs, ys, steps=1, alpha=ALPHA)
    for name in params:
        torch.testing.assert_close(one[name], params[name] - ALPHA * g[name], rtol=0, atol=1e-15)
