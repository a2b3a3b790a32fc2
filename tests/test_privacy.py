import math

import pytest
import torch

import lightfn as lf
from lightfn.privacy import NOISE_STREAM


def problem(n=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=dtype) * torch.linspace(0.1, 4.0, n, dtype=dtype)[:, None]
    y = torch.randn(n, generator=g, dtype=dtype)
    # Insertion order differs from sorted order: noise must follow one fixed leaf order.
    params = {"w": torch.randn(3, generator=g, dtype=dtype), "b": torch.randn(2, generator=g, dtype=dtype)}

    def loss_fn(p, batch):
        xb, yb = batch
        err = xb @ p["w"] + p["b"].sum() - yb
        return (err**2).mean(), {"mae": err.abs().mean()}

    return loss_fn, params, (x, y)


def manual_dp_grad(loss_fn, params, batch, *, clip, sigma, key, divisor, rows):
    """DP-SGD by hand: a loop of single-row grads, clip, sum, noise, divide (float64)."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in rows:
        row = lf.tree.map(lambda t: t[i : i + 1], batch)
        g = torch.func.grad(lambda p: loss_fn(p, row)[0])(params)
        norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
        scale = min(1.0, clip / norm)
        for k in total:
            total[k] += g[k] * scale
    noise_key = lf.random.fold_in(key, NOISE_STREAM)
    for j, k in enumerate(total):  # torch pytree order: dict insertion order
        z = lf.random.normal(lf.random.fold_in(noise_key, j), total[k].shape, total[k].dtype)
        total[k] = total[k] + sigma * clip * z
    return {k: v / divisor for k, v in total.items()}


def test_clipping_and_noise_match_a_manual_computation_in_float64():
    loss_fn, params, batch = problem()
    opt = lf.optim.sgd(1.0)
    state = lf.TrainState.create(params=params, optimizer=opt, seed=5)
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=0.7, noise_multiplier=1.3)
    new, metrics = step(state, batch)
    key = lf.random.fold_in(state.rng, state.step)
    want = manual_dp_grad(loss_fn, params, batch, clip=0.7, sigma=1.3, key=key, divisor=6, rows=range(6))
    # Some rows are clipped and some are not, so both branches of min(1, C/||g||) are checked.
    norms = lf.tree.global_norm
    per_row = [norms(torch.func.grad(lambda p: loss_fn(p, lf.tree.map(lambda t: t[i : i + 1], batch))[0])(params)) for i in range(6)]
    assert min(per_row) < 0.7 < max(per_row)
    for k in params:
        torch.testing.assert_close(params[k] - new.params[k], want[k], rtol=1e-12, atol=1e-12)
    assert int(new.step) == 1
    rows = [loss_fn(params, lf.tree.map(lambda t: t[i : i + 1], batch)) for i in range(6)]
    assert metrics["loss"].item() == pytest.approx(sum(r[0].item() for r in rows) / 6, rel=1e-12)
    assert metrics["mae"].item() == pytest.approx(sum(r[1]["mae"].item() for r in rows) / 6, rel=1e-12)


def test_expected_batch_size_is_the_divisor():
    loss_fn, params, batch = problem()
    opt = lf.optim.sgd(1.0)
    state = lf.TrainState.create(params=params, optimizer=opt, seed=1)
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=0.5, noise_multiplier=0.0, expected_batch_size=4.0)
    new, _ = step(state, batch)
    want = manual_dp_grad(loss_fn, params, batch, clip=0.5, sigma=0.0, key=state.rng, divisor=4.0, rows=range(6))
    for k in params:
        torch.testing.assert_close(params[k] - new.params[k], want[k], rtol=1e-12, atol=1e-12)


def test_noise_has_the_right_scale_and_is_reproducible_from_the_state():
    params = {"w": torch.zeros(20_000, dtype=torch.float64)}

    def loss_fn(p, x):  # zero gradient: the update is pure noise
        return (p["w"].sum() * 0.0) + x.sum() * 0.0

    opt = lf.optim.sgd(1.0)
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=2.0, noise_multiplier=1.5)
    x = torch.ones(8, 1, dtype=torch.float64)
    state = lf.TrainState.create(params=params, optimizer=opt, seed=0)
    a, _ = step(state, x)
    b, _ = step(state, x)
    assert torch.equal(a.params["w"], b.params["w"])
    noise = -a.params["w"]
    assert noise.std().item() == pytest.approx(1.5 * 2.0 / 8, rel=0.03)
    assert abs(noise.mean().item()) < 4 * 0.375 / math.sqrt(20_000)
    # The next step and another seed draw different noise.
    c, _ = step(a, x)
    other, _ = step(lf.TrainState.create(params=params, optimizer=opt, seed=1), x)
    assert not torch.equal(a.params["w"] - c.params["w"], noise)
    assert not torch.equal(other.params["w"], a.params["w"])


def test_resume_from_a_checkpoint_adds_the_same_noise(tmp_path):
    loss_fn, params, batch = problem()
    opt = lf.optim.adam(0.1)
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=0.5, noise_multiplier=1.0)
    state = lf.TrainState.create(params=params, optimizer=opt, seed=3)
    for _ in range(2):
        state, _ = step(state, batch)
    lf.save(tmp_path / "s.safetensors", state)
    resumed = lf.load(tmp_path / "s.safetensors", like=lf.TrainState.create(params=params, optimizer=opt, seed=9))
    for _ in range(2):
        state, _ = step(state, batch)
        resumed, _ = step(resumed, batch)
    for k in params:
        assert torch.equal(state.params[k], resumed.params[k])


def test_masked_rows_are_ignored_whatever_their_values():
    loss_fn, params, (x, y) = problem(n=6)
    keep = torch.tensor([True, False, True, True, False, True])
    bad_x, bad_y = x.clone(), y.clone()
    bad_x[~keep] = float("nan")
    bad_y[~keep] = 1e30
    opt = lf.optim.sgd(1.0)
    state = lf.TrainState.create(params=params, optimizer=opt, seed=2)
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=0.6, noise_multiplier=0.8)
    masked, m = step(state, lf.data.MaskedBatch(data=(bad_x, bad_y), mask=keep))
    real, m_real = step(state, (x[keep], y[keep]))  # the same key, so the same noise
    for k in params:
        torch.testing.assert_close(masked.params[k], real.params[k], rtol=1e-12, atol=1e-12)
    assert m["loss"].item() == pytest.approx(m_real["loss"].item(), rel=1e-12)
    key = lf.random.fold_in(state.rng, state.step)
    want = manual_dp_grad(loss_fn, params, (x, y), clip=0.6, sigma=0.8, key=key, divisor=4, rows=[0, 2, 3, 5])
    for k in params:
        torch.testing.assert_close(params[k] - masked.params[k], want[k], rtol=1e-12, atol=1e-12)
    # An all-masked batch is pure noise over the divisor and reports loss 0, not NaN.
    empty, m_empty = step(state, lf.data.MaskedBatch(data=(bad_x, bad_y), mask=torch.zeros(6, dtype=torch.bool)))
    assert m_empty["loss"].item() == 0.0 and all(torch.isfinite(v).all() for v in empty.params.values())


def test_dropout_is_drawn_per_row():
    params = {"w": torch.ones(32, dtype=torch.float64)}

    def loss_fn(p, x):
        return torch.nn.functional.dropout(x * p["w"], 0.5).sum()

    opt = lf.optim.sgd(1.0)
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=1e6, noise_multiplier=0.0, expected_batch_size=1.0)
    state = lf.TrainState.create(params=params, optimizer=opt, seed=0)
    new, _ = step(state, torch.ones(2, 32, dtype=torch.float64))
    total = params["w"] - new.params["w"]  # sum of the two rows' masks, each scaled by 2
    assert set(total.unique().tolist()) <= {0.0, 2.0, 4.0} and (total == 2.0).any()


def test_bad_settings_are_refused():
    loss_fn, params, (x, y) = problem()
    opt = lf.optim.sgd(0.1)
    with pytest.raises(lf.PrivacyError, match="l2_norm_clip"):
        lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=0.0, noise_multiplier=1.0)
    with pytest.raises(lf.PrivacyError, match="noise_multiplier"):
        lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=1.0, noise_multiplier=-1.0)
    with pytest.raises(lf.StepError, match="16-mixed"):
        lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=1.0, noise_multiplier=1.0, precision="16-mixed")
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=1.0, noise_multiplier=1.0)
    state = lf.TrainState.create(params=params, optimizer=opt)
    with pytest.raises(lf.StepError, match=r"batch\.mask is torch\.int64"):
        step(state, lf.data.MaskedBatch(data=(x, y), mask=torch.ones(6, dtype=torch.int64)))
    with pytest.raises(lf.StepError, match=r"batch\[1\] has 5"):
        step(state, (x, y[:5]))


@pytest.mark.compile
def test_compiled_dp_step_is_one_graph_and_matches_eager():
    loss_fn, params, (x, y) = problem(n=8, dtype=torch.float32)
    opt = lf.optim.adam(0.05)
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=0.5, noise_multiplier=1.1, expected_batch_size=4.0)
    compiled = lf.jit(step)
    a = b = lf.TrainState.create(params=params, optimizer=opt, seed=4)
    for i in range(3):
        mask = torch.arange(8) % 3 != i
        batch = lf.data.MaskedBatch(data=(x + i, y), mask=mask)
        a, ma = step(a, batch)
        b, mb = compiled(b, batch)
    for k in params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-5, atol=1e-6)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


# ------------------------------------------------------------------ accountant


@pytest.mark.parametrize(
    "sigma,q,steps,delta",
    [(1.1, 0.01, 1000, 1e-5), (0.8, 0.004, 10_000, 1e-5), (2.0, 0.05, 500, 1e-6), (1.0, 1.0, 10, 1e-5), (5.0, 0.2, 50, 1e-3)],
)
def test_epsilon_matches_opacus_rdp_accountant(sigma, q, steps, delta):
    pytest.importorskip("dp_accounting", reason="install lightfn[privacy]")
    opacus_accountants = pytest.importorskip("opacus.accountants", reason="install lightfn[dev]")
    ref = opacus_accountants.RDPAccountant()
    for _ in range(steps):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    want = ref.get_epsilon(delta)
    got = lf.privacy.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert got == pytest.approx(want, rel=0.02)
    # The PLD accountant is tighter than RDP's bound, never looser.
    pld = lf.privacy.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="pld")
    assert 0 < pld <= got * 1.001


def test_epsilon_edges_and_max_steps():
    pytest.importorskip("dp_accounting", reason="install lightfn[privacy]")
    assert lf.privacy.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0
    assert lf.privacy.epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=5, delta=1e-5) == math.inf
    eps = [lf.privacy.epsilon(noise_multiplier=1.5, sample_rate=0.05, steps=t, delta=1e-5) for t in (10, 100, 1000)]
    assert eps[0] < eps[1] < eps[2]
    t = lf.privacy.max_steps(noise_multiplier=1.5, sample_rate=0.05, delta=1e-5, target_epsilon=eps[1])
    assert t == 100  # epsilon(100) fits exactly, 101 does not
    assert lf.privacy.max_steps(noise_multiplier=1.5, sample_rate=0.05, delta=1e-5, target_epsilon=1e-6) == 0


def test_accountant_arguments_are_checked(monkeypatch):
    with pytest.raises(lf.PrivacyError, match="sample_rate"):
        lf.privacy.epsilon(noise_multiplier=1.0, sample_rate=0.0, steps=1, delta=1e-5)
    with pytest.raises(lf.PrivacyError, match="delta"):
        lf.privacy.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1.0)
    with pytest.raises(lf.PrivacyError, match="accountant"):
        lf.privacy.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5, accountant="gdp")
    with pytest.raises(lf.PrivacyError, match="steps"):
        lf.privacy.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=-1, delta=1e-5)
    monkeypatch.setitem(__import__("sys").modules, "dp_accounting", None)  # as if not installed
    with pytest.raises(lf.PrivacyError, match=r"pip install 'lightfn\[privacy\]'"):
        lf.privacy.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5)


def test_fit_with_dp_step_and_privacy_budget_stops_at_the_target():
    pytest.importorskip("dp_accounting", reason="install lightfn[privacy]")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.05 * torch.randn(100, generator=g)
    loader = lf.data.ArrayLoader((x, y), poisson_rate=0.1, seed=0)  # 10 batches an epoch
    sigma, delta = 1.0, 1e-5
    target = lf.privacy.epsilon(noise_multiplier=sigma, sample_rate=0.1, steps=15, delta=delta)

    def loss_fn(p, batch):
        xb, yb = batch
        return ((xb @ p["w"] - yb) ** 2).mean()

    opt = lf.optim.sgd(0.1)
    step = lf.privacy.dp_train_step(
        loss_fn, opt, l2_norm_clip=1.0, noise_multiplier=sigma, expected_batch_size=loader.expected_batch_size
    )
    budget = lf.privacy.PrivacyBudget(noise_multiplier=sigma, sample_rate=0.1, delta=delta, target_epsilon=target)
    seen = {}

    class Record(lf.callbacks.Callback):
        def on_epoch_end(self, ctx):
            seen.setdefault("epoch_steps", []).append(ctx.step)

        def on_fit_end(self, ctx):
            seen["metrics"] = dict(ctx.metrics)

    state = lf.TrainState.create(params={"w": torch.zeros(3)}, optimizer=opt, seed=0)
    state = lf.fit(step, state, loader, max_epochs=10, callbacks=[budget, Record()], jit=False, progress=False)
    assert budget.max_steps == 15
    assert int(state.step) == 15  # stopped mid-epoch 2, at the budget, not at an epoch end
    assert seen["metrics"]["privacy/epsilon"] == pytest.approx(target, rel=1e-9)
    assert seen["epoch_steps"][0] == 10
    assert (state.params["w"] - torch.tensor([1.0, -1.0, 0.5])).norm() < (torch.tensor([1.0, -1.0, 0.5])).norm()
