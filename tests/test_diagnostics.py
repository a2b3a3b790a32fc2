"""_diagnostics.py: how every error message names a value, a function, a tree difference."""

from __future__ import annotations

import functools

import torch

from lightfn._diagnostics import describe, diff_by_path, first_line, fn_name, keystr, not_a_tensor


def test_describe_in_prose_and_brief():
    assert describe(torch.zeros(3)) == "a tensor of shape (3,) float32"
    assert describe((torch.zeros(1), {})) == "a tuple of 2 (Tensor, dict)"
    assert describe([]) == "an empty list" and describe(()) == "an empty tuple"
    assert describe([1]) == "a list"
    assert describe(torch.zeros(2, 1, dtype=torch.int64), brief=True) == "tensor(2, 1) int64"
    assert describe(2.5, brief=True) == "float 2.5"


def test_first_line_of_a_long_error():
    assert first_line(RuntimeError("\n  the gist  \npages of internals")) == "the gist"
    assert first_line(RuntimeError("x" * 500), 10) == "x" * 10
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(RuntimeError(), fallback="") == ""


def test_fn_name_and_not_a_tensor():
    def loss_fn(p):
        return p

    assert fn_name(loss_fn) == "function 'test_fn_name_and_not_a_tensor.<locals>.loss_fn'"
    assert fn_name(functools.partial(loss_fn)) == fn_name(loss_fn)
    assert fn_name(torch.nn.Linear(1, 1)) == "module Linear"
    assert fn_name(lambda x: x) == "the function"
    assert not_a_tensor("x['a']", 3, "convert it") == "x['a'] has type int, not a tensor: convert it"


def test_diff_by_path_lines():
    expected = {("a",): torch.zeros(2), ("b",): torch.zeros(1)}
    actual = {("a",): torch.zeros(3), ("c",): 1.0}
    lines = diff_by_path(expected, actual, same=lambda e, a: e.shape == a.shape)
    assert lines == [
        "  ['a']: expected tensor(2,) float32, got tensor(3,) float32",
        "  ['b']: missing (expected tensor(1,) float32)",
        "  ['c']: unexpected leaf float 1.0",
    ]
    assert keystr(("layers", 0, "w"), root="params") == "params['layers'][0]['w']"
