"""lf.summary: exact counts, bytes, dtypes and trainable flags per subtree, and fit printing it once
at the start (rank 0 only, only when progress output is on)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

import lightfn as lf
from lightfn.summary import human_bytes


def rows(text):
    """The table as lists of cells (cells are separated by two or more spaces)."""
    import re

    lines = text.splitlines()
    assert lines[0].split() == ["Name", "Params", "Size", "Dtype", "Trainable"]
    body = [re.split(r"\s{2,}", line.strip()) for line in lines[1:] if not line.startswith(("Trainable params", "Frozen", "Total"))]
    totals = [line for line in lines if line.startswith(("Trainable params", "Frozen", "Total"))]
    return body, totals


def nested():
    return {
        "encoder": {"layer1": {"w": torch.zeros(8, 4), "b": torch.zeros(4)}, "layer2": {"w": torch.zeros(4, 2)}},
        "head": {"w": torch.zeros(2, 3, dtype=torch.float64), "scale": torch.ones((), dtype=torch.bfloat16)},
        "steps": torch.zeros(5, dtype=torch.int64),
    }


def test_nested_params_top_level_rows_with_exact_counts_and_bytes():
    body, totals = rows(lf.summary(nested()))
    assert body == [
        ["encoder", "44", "176 B", "float32", "yes"],         # 32 + 4 + 8 floats of 4 bytes
        ["head", "7", "50 B", "bfloat16,float64", "yes"],     # 1 * 2 + 6 * 8 bytes (keys sorted: scale, w)
        ["steps", "5", "40 B", "int64", "yes"],
    ]
    assert totals == ["Trainable params: 56", "Frozen params: 0", "Total params: 56 (266 B)"]
    assert sum(int(r[1]) for r in body) == lf.tree.size(nested())


def test_depth_two_and_trainable_as_a_prefix_or_a_predicate():
    body, totals = rows(lf.summary(nested(), depth=2, trainable={"encoder": {"layer1": False, "layer2": True},
                                                                "head": True, "steps": False}))
    assert body == [
        ["encoder.layer1", "36", "144 B", "float32", "no"],
        ["encoder.layer2", "8", "32 B", "float32", "yes"],
        ["head.scale", "1", "2 B", "bfloat16", "yes"],
        ["head.w", "6", "48 B", "float64", "yes"],
        ["steps", "5", "40 B", "int64", "no"],
    ]
    assert totals == ["Trainable params: 15", "Frozen params: 41", "Total params: 56 (266 B)"]
    # a predicate on the key path; a subtree with both kinds says so
    body, totals = rows(lf.summary(nested(), trainable=lambda path: path[-1] != "b"))
    assert body[0] == ["encoder", "44", "176 B", "float32", "partly"]
    assert totals[:2] == ["Trainable params: 52", "Frozen params: 4"]


def test_functionalized_sequential_rows_by_layer_in_layer_order():
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(11)], nn.ReLU(), nn.Linear(3, 2, bias=False))
    _, params = lf.functionalize(model)
    body, totals = rows(lf.summary(params))
    assert [r[0] for r in body] == [str(i) for i in range(11)] + ["12"]  # 0, 1, ..., 10, 12: not 0, 1, 10, 11
    assert body[0] == ["0", "12", "48 B", "float32", "yes"]
    assert body[-1] == ["12", "6", "24 B", "float32", "yes"]
    n = sum(p.numel() for p in model.parameters())
    assert n == 11 * 12 + 6 and totals[-1] == f"Total params: {n} ({human_bytes(4 * n)})"
    body, _ = rows(lf.summary(params, depth=2, trainable=lambda path: not path[0].startswith("0.")))
    assert body[:2] == [["0.bias", "3", "12 B", "float32", "no"], ["0.weight", "9", "36 B", "float32", "no"]]
    assert body[2] == ["1.bias", "3", "12 B", "float32", "yes"]


def test_human_sizes_and_thousands():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 3 * 1024**2, 5 * 1024**3)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "3.0 MiB", "5.0 GiB"]
    body, _ = rows(lf.summary({"big": torch.zeros(1000, 1001, dtype=torch.float16)}))
    assert body == [["big", "1,001,000", "1.9 MiB", "float16", "yes"]]


def test_bad_arguments_name_what_to_fix():
    with pytest.raises(lf.TreeError, match=r"\['head'\].*expected True or False"):
        lf.summary(nested(), trainable={"encoder": True, "head": 1, "steps": True})
    with pytest.raises(lf.TreeError, match="missing"):
        lf.summary(nested(), trainable={"encoder": True})
    with pytest.raises(lf.TreeError, match=r"predicate must return True or False"):
        lf.summary(nested(), trainable=lambda path: "yes")
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        lf.summary(nested(), depth=0)


# ----------------------------------------------------------------------------- in fit


def run(**kw):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))

    def loss_fn(p, batch):
        return ((batch @ p["enc"]["w"]) ** 2).mean() + p["head"].sum()

    opt = lf.optim.sgd(0.1)
    state = lf.TrainState.create(params={"enc": {"w": torch.zeros(4, 3)}, "head": torch.zeros(2)}, optimizer=opt)
    return lf.fit(lf.train_step(loss_fn, opt), state, lf.data.ArrayLoader(x, batch_size=4), max_epochs=2, jit=False,
                  num_sanity_val_steps=0, **kw)


def test_fit_prints_the_summary_once_at_the_start(capsys):
    run()
    lines = capsys.readouterr().out.splitlines()
    table = lf.summary({"enc": {"w": torch.zeros(4, 3)}, "head": torch.zeros(2)}).splitlines()
    assert lines[:len(table)] == table and table[-1] == "Total params: 14 (56 B)"
    assert [line.split("  ")[0] for line in lines[len(table):]] == ["epoch 1/2", "epoch 2/2"]
    assert sum(line == table[0] for line in lines) == 1


def test_fit_prints_no_summary_when_asked_or_silenced_or_not_rank_0(capsys, monkeypatch):
    run(summary=False)
    assert "Total params" not in capsys.readouterr().out
    run(progress=False)
    assert capsys.readouterr().out == ""
    run(progress=False, summary=True)
    assert capsys.readouterr().out.splitlines()[-1] == "Total params: 14 (56 B)"
    monkeypatch.setattr(sys.modules["lightfn.fit._processes"], "is_main", lambda: False)
    run(summary=True)
    assert capsys.readouterr().out == ""
