import pytest
import torch
import torch.nn as nn

import lightfn as lf


def problem(n=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randn(n, generator=g, dtype=dtype)
    params = {"w": torch.randn(4, generator=g, dtype=dtype), "b": torch.randn((), generator=g, dtype=dtype)}

    def loss_fn(p, batch):
        xb, yb = batch
        err = torch.tanh(xb @ p["w"] + p["b"]) - yb
        return (err**2).mean(), {"mae": err.abs().mean()}

    return loss_fn, params, (x, y)


def loop_reference(loss_fn, params, batch, rows):
    """Per-row gradients by a Python loop of torch.func.grad on batches of one."""
    out = []
    for i in range(rows):
        row = lf.tree.map(lambda t: t[i : i + 1], batch)
        out.append(torch.func.grad(lambda p: loss_fn(p, row)[0])(params))
    return lf.tree.stack(out)


def test_matches_a_loop_of_single_row_grads_in_float64():
    loss_fn, params, batch = problem()
    got = lf.per_sample_grad(loss_fn)(params, batch)
    want = loop_reference(loss_fn, params, batch, 7)
    assert got["w"].shape == (7, 4) and got["b"].shape == (7,)
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    # The per-row mean of per-sample grads is the batch gradient of a mean loss.
    full = torch.func.grad(lambda p: loss_fn(p, batch)[0])(params)
    torch.testing.assert_close(got["w"].mean(0), full["w"], rtol=1e-12, atol=1e-12)


def test_functionalized_module_matches_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 2)).double()
    apply, params = lf.functionalize(model)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])

    def loss_fn(p, batch):
        return nn.functional.cross_entropy(apply(p, batch["x"]), batch["y"])

    got = lf.per_sample_grad(loss_fn)(params, {"x": x, "y": y})
    for i in range(5):
        want = torch.func.grad(loss_fn)(params, {"x": x[i : i + 1], "y": y[i : i + 1]})
        for k in params:
            assert got[k].shape == (5, *params[k].shape)
            torch.testing.assert_close(got[k][i], want[k], rtol=1e-12, atol=1e-12)


def test_chunk_size_gives_the_same_grads():
    loss_fn, params, batch = problem(n=10)
    whole = lf.per_sample_grad(loss_fn)(params, batch)
    for chunk in (1, 3, 10, 64):
        chunked = lf.per_sample_grad(loss_fn, chunk_size=chunk)(params, batch)
        for k in params:
            torch.testing.assert_close(chunked[k], whole[k], rtol=1e-12, atol=1e-12)


def test_mismatched_leading_dims_name_the_leaf():
    loss_fn, params, (x, y) = problem()
    with pytest.raises(lf.StepError, match=r"batch\[1\] has 6 \(shape \(6,\)\)") as e:
        lf.per_sample_grad(loss_fn)(params, (x, y[:6]))
    assert "batch[0] has 7" in str(e.value)
    with pytest.raises(lf.StepError, match=r"batch\['y'\] is a 0-d tensor"):
        lf.per_sample_grad(lambda p, b: (b["x"] @ p["w"]).sum())(params, {"x": x, "y": torch.tensor(1.0)})
    with pytest.raises(lf.StepError, match="chunk_size"):
        lf.per_sample_grad(loss_fn, chunk_size=0)


def test_masked_rows_get_zero_gradient():
    loss_fn, params, (x, y) = problem()
    mask = torch.tensor([True, False, True, True, False, True, True])
    plain = lf.per_sample_grad(loss_fn)(params, (x, y))
    masked = lf.per_sample_grad(loss_fn)(params, lf.data.MaskedBatch(data=(x, y), mask=mask))
    for k in params:
        torch.testing.assert_close(masked[k][mask], plain[k][mask], rtol=0, atol=0)
        assert torch.count_nonzero(masked[k][~mask]) == 0


def test_key_gives_each_row_its_own_dropout_mask():
    params = {"w": torch.ones(16, dtype=torch.float64)}

    def loss_fn(p, x):
        return nn.functional.dropout(x * p["w"], 0.5).sum()

    x = torch.ones(4, 16, dtype=torch.float64)
    key = lf.random.key(3)
    got = lf.per_sample_grad(loss_fn)(params, x, key=key)
    # Row i draws exactly what a single-row run in rng_scope(fold_in(key, i)) draws.
    for i in range(4):
        with lf.random.rng_scope(lf.random.fold_in(key, i)):
            want = torch.func.grad(loss_fn)(params, x[i : i + 1])
        torch.testing.assert_close(got["w"][i], want["w"], rtol=0, atol=0)
    assert not torch.equal(got["w"][0], got["w"][1])
    assert torch.equal(got["w"], lf.per_sample_grad(loss_fn)(params, x, key=key)["w"])
