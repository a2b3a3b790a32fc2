"""lightfn.predict: batched inference equals a manual loop, in input order."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightfn.data import ArrayLoader, DataError
from lightfn.errors import StepError
from lightfn.export import export
from lightfn.predict import default_device, predict

torch.manual_seed(0)
MODULE = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
PARAMS = dict(MODULE.named_parameters())  # requires_grad: predict must still not build graphs
X = torch.randn(300, 12)


def apply(params, x):
    return functional_call(MODULE, params, (x,))


def manual_loop(fn, x, batch_size):
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def test_tensor_data_equals_manual_loop_with_ragged_last_batch():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return apply(PARAMS, x)

    got = predict(fn, X, batch_size=64, device="cpu")
    assert calls == [64, 64, 64, 64, 44]
    want = manual_loop(lambda x: apply(PARAMS, x), X, 64)
    assert got.shape == (300, 3)
    assert torch.equal(got, want)
    assert not got.requires_grad and got.device.type == "cpu"


def test_params_argument_is_passed_first():
    got = predict(apply, X, batch_size=128, params=PARAMS, device="cpu")
    assert torch.equal(got, manual_loop(lambda x: apply(PARAMS, x), X, 128))


def test_pytree_data_and_pytree_outputs():
    ids = torch.arange(300)

    def fn(batch):
        x, i = batch
        z = apply(PARAMS, x)
        return {"z": z, "extra": (i * 2, z.sum(1))}

    got = predict(fn, (X, ids), batch_size=70, device="cpu")
    z = manual_loop(lambda x: apply(PARAMS, x), X, 70)
    assert torch.equal(got["z"], z)
    assert torch.equal(got["extra"][0], ids * 2)  # input order preserved
    assert torch.allclose(got["extra"][1], z.sum(1))


def test_dict_data_is_sliced_leafwise():
    got = predict(lambda b: b["x"][:, :2] + b["y"], {"x": X, "y": torch.ones(300, 1)}, batch_size=100, device="cpu")
    assert torch.equal(got, X[:, :2] + 1)


def test_iterables_of_batches():
    fn = lambda x: apply(PARAMS, x)  # noqa: E731
    want = manual_loop(fn, X, 50)
    batches = [X[i : i + 50] for i in range(0, 300, 50)]
    assert torch.equal(predict(fn, batches, device="cpu"), want)
    assert torch.equal(predict(fn, iter(batches), device="cpu"), want)
    loader = DataLoader(TensorDataset(X), batch_size=50, shuffle=False)
    assert torch.equal(predict(lambda b: fn(b[0]), loader, device="cpu"), want)
    arrays = ArrayLoader(X, batch_size=64, shuffle=False, drop_last=False)
    assert torch.equal(predict(fn, arrays, device="cpu"), manual_loop(fn, X, 64))


def test_shuffled_loaders_are_refused():
    with pytest.raises(DataError, match="shuffle=False"):
        predict(lambda x: x, ArrayLoader(X, batch_size=64, shuffle=True), device="cpu")
    with pytest.raises(DataError, match="shuffle=False"):
        predict(lambda b: b[0], DataLoader(TensorDataset(X), batch_size=64, shuffle=True), device="cpu")


def test_exported_program_as_predictor():
    module = export(lambda x: apply(PARAMS, x), X[:1]).module()
    got = predict(module, X, batch_size=128, device="cpu")
    assert (got - manual_loop(lambda x: apply(PARAMS, x), X, 128)).abs().max().item() <= 1e-5


def test_bad_outputs_and_data():
    with pytest.raises(StepError, match=r"output \['loss'\] of batch 0 is a 0-d tensor"):
        predict(lambda x: {"loss": x.sum()}, X, device="cpu")
    with pytest.raises(DataError, match="disagree"):
        predict(lambda b: b, (X, torch.zeros(5)), device="cpu")
    with pytest.raises(DataError, match="no batches"):
        predict(lambda x: x, [], device="cpu")
    with pytest.raises(DataError, match="batch_size"):
        predict(lambda x: x, X, batch_size=0, device="cpu")
    with pytest.raises(DataError, match="iterable"):
        predict(lambda x: x, 3, device="cpu")


def test_auto_device_and_output_device():
    dev = default_device()
    assert dev.type in ("cuda", "mps", "cpu")
    got = predict(lambda x: x * 2, X, batch_size=128)  # device="auto"
    assert got.device.type == "cpu" and torch.equal(got, X * 2)
    kept = predict(lambda x: x * 2, X, batch_size=128, output_device=None)
    assert kept.device.type == dev.type


@pytest.mark.compile
def test_jit_equals_eager_across_ragged_batches():
    fn = lambda x: apply(PARAMS, x)  # noqa: E731
    got = predict(fn, X, batch_size=64, device="cpu", jit=True)
    assert (got - manual_loop(fn, X, 64)).abs().max().item() <= 1e-5
