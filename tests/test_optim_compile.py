"""lf.optim inside a whole compiled train step: one graph (no breaks), same numbers as eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lightfn as lf
from lightfn import optim


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(6)]

    def loss_fn(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    return params, data, loss_fn


def make_step(opt, loss_fn):
    def step(params, opt_state, x, y):
        loss, grads = torch.func.grad_and_value(loss_fn)(params, x, y)[::-1]
        updates, opt_state = opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, loss

    return step


def run(step, params, state, data):
    losses = []
    for x, y in data:
        params, state, loss = step(params, state, x, y)
        losses.append(loss)
    return params, state, torch.stack(losses)


def compare_compiled_with_eager(opt):
    params, data, loss_fn = setup()
    step = make_step(opt, loss_fn)
    eager = run(step, params, opt.init(params), data)
    torch._dynamo.utils.counters.clear()
    compiled = run(torch.compile(step, fullgraph=True), params, opt.init(params), data)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    lf.tree.assert_same_structure(eager, compiled, check_shapes=True)
    diffs = [(a.double() - b.double()).abs().max().item() for a, b in zip(lf.tree.leaves(eager), lf.tree.leaves(compiled))]
    assert max(diffs) <= 1e-6, max(diffs)
    assert eager[2][-1] < eager[2][0]  # it trained
    return eager, compiled


@pytest.mark.compile
def test_adam_with_global_norm_clipping_compiles_whole_and_matches_eager():
    sched = optim.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=10)
    opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adam(sched, weight_decay=1e-4))
    eager, compiled = compare_compiled_with_eager(opt)
    assert optim.current_lr(compiled[1]).item() == pytest.approx(sched(5))


@pytest.mark.compile
def test_masked_multi_transform_under_multi_steps_compiles_whole_and_matches_eager():
    # Masking leaves dict subtrees made only of None in the inner states: dynamo must still
    # trace it as one graph (lf.optim walks such trees with map only).
    opt = optim.multi_steps(
        optim.chain(
            optim.clip_by_global_norm(1.0),
            optim.multi_transform(
                {"adamw": optim.adamw(1e-2, amsgrad=True), "frozen": optim.set_to_zero(), "sgd": optim.sgd(0.1, momentum=0.9)},
                {"0.weight": "adamw", "0.bias": "frozen", "2.weight": "sgd", "2.bias": "sgd"},
            ),
        ),
        every_k=2,
    )
    eager, compiled = compare_compiled_with_eager(opt)
    assert compiled[1].gradient_step.item() == 3
