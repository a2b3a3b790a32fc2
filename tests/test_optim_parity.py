"""lf.optim aliases against torch.optim: float64, >= 100 steps of a real MLP on sklearn digits.

Both sides start from the same weights and see the same mini-batches; every param must
agree to a relative error of 1e-9 at the end (and training must actually have moved it).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lightfn as lf
from lightfn import optim

STEPS = 120
BATCH = 64
RTOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny float64 ops: with the CPU shared by other jobs, intra-op threads only spin-wait
    # (measured ~40x slower with 2 threads under load).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float64), torch.tensor(y, dtype=torch.int64)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def batches(data, steps=STEPS):
    x, y = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    per_epoch = len(x) // BATCH
    for i in range(steps):
        j = i % per_epoch
        idx = order[j * BATCH : (j + 1) * BATCH]
        yield x[idx], y[idx]


def initial_params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in make_model().named_parameters()}


def run_torch(data, make_opt, *, groups=None, lr_lambda=None, clip_norm=None, clip_value=None):
    model = make_model()
    params = groups(model) if groups else model.parameters()
    opt = make_opt(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    lrs = []
    for xb, yb in batches(data):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched:
            sched.step()
    return {k: v.detach() for k, v in model.named_parameters()}, lrs


def run_lf(data, opt, *, on_step=None):
    model = make_model()
    params = initial_params()

    def loss_fn(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    state = opt.init(params)
    for xb, yb in batches(data):
        grads = torch.func.grad(loss_fn)(params, xb, yb)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        if on_step:
            on_step(state)
    return params, state


def assert_close_params(ours, theirs, rtol=RTOL):
    init = initial_params()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == torch.float64
        rel = ((ours[k] - theirs[k]).norm() / theirs[k].norm()).item()
        assert rel <= rtol, f"{k}: relative error {rel:.3e}"
    moved = max(((theirs[k] - init[k]).norm() / init[k].norm()).item() for k in theirs)
    assert moved > 1e-3, "training did not move the params: the comparison would be vacuous"


CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd", dict(lr=0.1, weight_decay=1e-2)),
    ("sgd", dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-2)),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, weight_decay=1e-2)),
    ("adam", dict(lr=1e-2, amsgrad=True)),
    ("adam", dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3, amsgrad=True)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("rmsprop", dict(lr=1e-3)),
    ("rmsprop", dict(lr=1e-3, momentum=0.9)),
    ("rmsprop", dict(lr=1e-3, centered=True)),
    ("rmsprop", dict(lr=1e-3, weight_decay=1e-2)),
    ("rmsprop", dict(lr=1e-3, alpha=0.9, eps=1e-6, momentum=0.5, centered=True, weight_decay=1e-3)),
    ("adagrad", dict(lr=0.05)),
    ("adagrad", dict(lr=0.05, lr_decay=1e-2)),
    ("adagrad", dict(lr=0.05, initial_accumulator_value=0.1)),
    ("adagrad", dict(lr=0.05, weight_decay=1e-2)),
    ("adagrad", dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-3, initial_accumulator_value=0.05, eps=1e-8)),
]

TORCH = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES])
def test_alias_matches_torch_optim(digits, name, kwargs):
    theirs, _ = run_torch(digits, lambda p: TORCH[name](p, **kwargs))
    ours, state = run_lf(digits, getattr(optim, name)(**kwargs))
    assert_close_params(ours, theirs)


def test_optax_style_betas_keywords(digits):
    theirs, _ = run_torch(digits, lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.85, 0.995)))
    ours, _ = run_lf(digits, optim.adam(1e-2, b1=0.85, b2=0.995))
    assert_close_params(ours, theirs)


def test_defaults_match_torch_optim():
    for name, torch_cls in TORCH.items():
        ours = inspect.signature(getattr(optim, name)).parameters
        theirs = inspect.signature(torch_cls.__init__).parameters
        shared = [k for k in ours if k in theirs]
        assert "lr" in shared and len(shared) >= 3, (name, shared)
        for k in shared:
            want = theirs[k].default
            want = tuple(want) if isinstance(want, tuple) else want
            assert ours[k].default == want, f"{name}({k}=...): ours {ours[k].default!r}, torch {want!r}"
        # positional order follows torch too (after torch's leading ``params``)
        torch_order = [k for k in list(theirs)[2:] if k in ours and theirs[k].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        our_order = [k for k in ours if k in torch_order]
        assert our_order == torch_order, name


def lion_reference(data, lr, b1, b2, wd):
    """Lion written out by hand (torch has no Lion)."""
    model = make_model()
    params = initial_params()
    m = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss_fn(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    for xb, yb in batches(data):
        g = torch.func.grad(loss_fn)(params, xb, yb)
        new = {}
        for k in params:
            direction = torch.sign(b1 * m[k] + (1 - b1) * g[k])
            new[k] = params[k] - lr * (direction + wd * params[k])
            m[k] = b2 * m[k] + (1 - b2) * g[k]
        params = new
    return params


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_matches_reference(digits, wd):
    theirs = lion_reference(digits, 1e-3, 0.9, 0.99, wd)
    ours, _ = run_lf(digits, optim.lion(1e-3, weight_decay=wd))
    assert_close_params(ours, theirs)


def test_lion_defaults():
    sig = inspect.signature(optim.lion).parameters
    assert sig["lr"].default == 1e-4 and sig["betas"].default == (0.9, 0.99) and sig["weight_decay"].default == 0.0


def test_schedule_matches_lambda_lr_and_current_lr_reports_it(digits):
    peak = 0.1
    sched = optim.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=10, decay_steps=100, end_value=1e-3)
    theirs, torch_lrs = run_torch(
        digits, lambda p: torch.optim.SGD(p, lr=peak, momentum=0.9), lr_lambda=lambda step: sched(step) / peak
    )
    seen = []
    ours, _ = run_lf(digits, optim.sgd(sched, momentum=0.9), on_step=lambda s: seen.append(optim.current_lr(s).item()))
    assert_close_params(ours, theirs)
    assert seen == pytest.approx(torch_lrs, rel=1e-12, abs=1e-15)
    assert seen[5] == pytest.approx(0.05) and seen[-1] == pytest.approx(1e-3)


def test_clip_by_global_norm_matches_clip_grad_norm(digits):
    theirs, _ = run_torch(digits, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), clip_norm=0.3)
    ours, _ = run_lf(digits, optim.chain(optim.clip_by_global_norm(0.3), optim.sgd(0.1, momentum=0.9)))
    assert_close_params(ours, theirs)


def test_clip_matches_clip_grad_value(digits):
    theirs, _ = run_torch(digits, lambda p: torch.optim.Adam(p, lr=1e-2), clip_value=0.01)
    ours, _ = run_lf(digits, optim.chain(optim.clip(0.01), optim.adam(1e-2)))
    assert_close_params(ours, theirs)


def test_multi_transform_matches_torch_param_groups(digits):
    """Per-subtree learning rates and a frozen leaf == torch param groups."""

    def groups(model):
        return [{"params": [model[0].weight], "lr": 0.01}, {"params": list(model[2].parameters()), "lr": 0.2}]

    theirs, _ = run_torch(digits, lambda p: torch.optim.SGD(p, momentum=0.9), groups=groups)
    labels = {"0.weight": "slow", "0.bias": "frozen", "2.weight": "fast", "2.bias": "fast"}
    opt = optim.multi_transform(
        {"slow": optim.sgd(0.01, momentum=0.9), "fast": optim.sgd(0.2, momentum=0.9), "frozen": optim.set_to_zero()},
        labels,
    )
    ours, state = run_lf(digits, opt)
    assert torch.equal(ours["0.bias"], initial_params()["0.bias"])
    assert_close_params({k: v for k, v in ours.items() if k != "0.bias"}, {k: v for k, v in theirs.items() if k != "0.bias"})
    rates = {k: v.item() for k, v in optim.learning_rates(state).items()}
    assert sorted(rates.values()) == [0.01, 0.2]
    assert any("'slow'" in k for k in rates) and any("'fast'" in k for k in rates)


def test_adamw_mask_exempts_biases_like_torch_param_groups(digits):
    def groups(model):
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    theirs, _ = run_torch(digits, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5), groups=groups)
    no_bias = lambda params: lf.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    ours, _ = run_lf(digits, optim.adamw(1e-2, weight_decay=0.5, mask=no_bias))
    assert_close_params(ours, theirs)
    # and the mask mattered: decaying everything lands elsewhere
    all_decay, _ = run_lf(digits, optim.adamw(1e-2, weight_decay=0.5))
    assert not torch.allclose(all_decay["0.bias"], ours["0.bias"], rtol=1e-6)
