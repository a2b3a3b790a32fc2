"""The forms of validation data: one loader, a dict of loaders, a list of loaders; nothing guessed."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightfn as lf
from lightfn.eval_sets import named_sets, prefix
from lightfn.fit import FitError

x, y = torch.randn(8, 3), torch.randn(8)
BATCH = (x, y)
ARRAY = lf.data.ArrayLoader(BATCH, batch_size=4)
TORCH = DataLoader(TensorDataset(x, y), batch_size=4)


def test_one_loader_in_any_form_is_one_unnamed_set():
    for data in (ARRAY, TORCH, [BATCH, BATCH], (BATCH,), [x, x], [{"x": x}], iter([BATCH]), []):
        assert named_sets(data) == {None: data}
    assert prefix("val", None) == "val/" and prefix("test", "clean") == "test/clean/"


def test_several_loaders_are_named_by_key_or_position():
    sets = {"clean": ARRAY, "noisy": [BATCH], "torch": TORCH, "gen": (b for b in [BATCH])}
    assert named_sets(sets) == sets
    assert named_sets([ARRAY, TORCH, [BATCH, BATCH], ({"x": x},)]) == {
        "0": ARRAY, "1": TORCH, "2": [BATCH, BATCH], "3": ({"x": x},)}


@pytest.mark.parametrize("data, message", [
    ({"x": x, "y": y}, r"val_data\['x'\] is a tensor of shape \(8, 3\) float32, not a loader"),
    ({"one": BATCH}, r"val_data\['one'\] is a tuple of 2 \(Tensor, Tensor\), not a loader"),
    ({1: [BATCH]}, "has the key 1"),
    ([BATCH, ARRAY], r"mixes batches \(val_data\[0\].*loaders \(val_data\[1\]"),
    ([[BATCH], [[BATCH]]], r"val_data\[1\] is a list, neither a batch"),
    (["a.csv", "b.csv"], r"val_data\[0\] is a str, neither a batch"),
])
def test_unclear_forms_are_refused(data, message):
    with pytest.raises(FitError, match=message):
        named_sets(data)
