import pytest
import torch

import lightfn as lf

torch.manual_seed(0)


def mlp_loss(params, x):
    h = torch.tanh(x @ params["w1"] + params["b1"])
    return (h @ params["w2"]).pow(2).mean()


def make_params():
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(5, 4, generator=g, dtype=torch.float64),
        "b1": torch.randn(4, generator=g, dtype=torch.float64),
        "w2": torch.randn(4, 2, generator=g, dtype=torch.float64),
    }


def test_grad_equals_autograd():
    params, x = make_params(), torch.randn(8, 5, dtype=torch.float64)
    g = lf.grad(mlp_loss)(params, x)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    mlp_loss(leaves, x).backward()
    for k in params:
        torch.testing.assert_close(g[k], leaves[k].grad, rtol=0, atol=1e-14)


def test_value_and_grad_jax_order_and_aux():
    params, x = make_params(), torch.randn(8, 5, dtype=torch.float64)

    def f(p, x):
        loss = mlp_loss(p, x)
        return loss, {"double": 2 * loss}

    (value, aux), grads = lf.value_and_grad(f, has_aux=True)(params, x)
    assert value.item() == pytest.approx(mlp_loss(params, x).item())
    assert aux["double"].item() == pytest.approx(2 * value.item())
    assert set(grads) == set(params)
    g, aux2 = lf.grad(f, has_aux=True)(params, x)
    torch.testing.assert_close(g["w1"], grads["w1"])
    # argnums picks the argument
    gx = lf.grad(mlp_loss, argnums=1)(params, x)
    assert gx.shape == x.shape


def test_grad_errors_name_the_problem():
    params, x = make_params(), torch.randn(8, 5, dtype=torch.float64)
    with pytest.raises(lf.StepError, match=r"scalar.*shape \(8, 2\)"):
        lf.grad(lambda p, x: torch.tanh(x @ p["w1"]) @ p["w2"])(params, x)
    with pytest.raises(lf.StepError, match="has_aux=True"):
        lf.grad(lambda p, x: (mlp_loss(p, x), {}))(params, x)
    with pytest.raises(lf.StepError, match=r"\['n'\] is int64"):
        lf.grad(lambda p, x: mlp_loss(p, x))({**params, "n": torch.tensor(1)}, x)
    with pytest.raises(lf.StepError, match=r"\['w'\] is a float"):
        lf.grad(lambda p, x: x.sum())({"w": 1.0}, x)


def test_vmap_in_axes():
    params, xs = make_params(), torch.randn(3, 8, 5, dtype=torch.float64)
    per = lf.vmap(mlp_loss, in_axes=(None, 0))(params, xs)
    torch.testing.assert_close(per, torch.stack([mlp_loss(params, x) for x in xs]))


def test_jit_disabled_runs_eagerly(monkeypatch):
    monkeypatch.setenv("LIGHTFN_DISABLE_JIT", "1")
    f = lf.jit(lambda x: x + 1)
    assert not f.compiled and f(torch.ones(1)).item() == 2.0
    assert not lf.jit(lambda x: x, disable=True).compiled


def test_donation_eager_writes_into_inputs():
    state = {"p": torch.ones(3), "n": torch.zeros((), dtype=torch.int64)}
    ptr = state["p"].data_ptr()
    f = lf.jit(lambda s, x: ({"p": s["p"] + x, "n": s["n"] + 1}, s["p"].sum()), donate=True, disable=True)
    new, _ = f(state, torch.ones(3))
    assert new["p"].data_ptr() == ptr and new["p"] is state["p"] and state["p"].tolist() == [2.0, 2.0, 2.0]
    bad = lf.jit(lambda s, x: ({"p": torch.ones(4), "n": s["n"]}, None), donate=True, disable=True)
    with pytest.raises(lf.StepError, match=r"\['p'\] changed from \(3,\)"):
        bad(state, torch.ones(3))


@pytest.mark.compile
def test_jit_one_graph_no_recompile_on_short_batch_and_donation_keeps_pointers():
    params = {k: v.float() for k, v in make_params().items()}

    def step(state, x):
        g = lf.grad(mlp_loss)(state, x)
        return {k: state[k] - 0.1 * g[k] for k in state}, mlp_loss(state, x)

    eager_state = {k: v.clone() for k, v in params.items()}
    state = {k: v.clone() for k, v in params.items()}
    ptrs = {k: v.data_ptr() for k, v in state.items()}
    f = lf.jit(step, donate=True)
    for bs in (8, 8, 3):
        x = torch.randn(bs, 5)
        state, loss = f(state, x)
        eager_state, eager_loss = step(eager_state, x)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for k in state:
        torch.testing.assert_close(state[k], eager_state[k], rtol=1e-6, atol=1e-6)
        assert state[k].data_ptr() == ptrs[k]
    c = torch._dynamo.utils.counters
    assert not c["graph_break"]
    assert c["stats"]["unique_graphs"] == 1


@pytest.mark.compile
def test_jit_graph_break_gives_short_actionable_error():
    def f(x):
        if x.sum() > 0:  # data-dependent Python branch
            return x + 1
        return x - 1

    with pytest.raises(lf.CompileError) as e:
        lf.jit(f)(torch.ones(3))
    msg = str(e.value)
    assert "one graph" in msg and "LIGHTFN_DISABLE_JIT=1" in msg and "jit=False" in msg
    assert len(msg.splitlines()) < 10


@pytest.mark.compile
def test_jit_reports_user_errors_not_dynamo_traces():
    with pytest.raises(lf.StepError, match="scalar"):
        lf.jit(lambda p, x: lf.grad(lambda p: p["w"] * x)(p))({"w": torch.ones(2)}, torch.ones(2))
