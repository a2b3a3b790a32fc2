"""How lightfn's error messages name things: one home for every message helper.

Errors a user can act on name the pytree path, the expected and the actual value, and
where in the user's code the problem sits. Every module that raises builds those pieces
here, so a value, a path or a tree difference reads the same in every message:

* :func:`keystr`: a key path (``['params']['enc.0.weight']``);
* :func:`describe`: a value, in prose (``a tensor of shape (3,) float32``) or brief
  (``tensor(3,) float32``, ``float 2.5``), and :func:`describe_type` for a type;
* :func:`not_a_tensor`: a pytree leaf that must be a tensor and is not;
* :func:`fn_name`: a user's function (``function 'loss_fn'``, ``module MLP``);
* :func:`diff_by_path`: the lines of a "these two trees differ" message, one per path;
* :func:`first_line` and :func:`user_frame`: the gist of a torch error and the innermost
  frame of the user's own code (under compile and export errors torch's text is long).

This module sits below everything else (it imports only torch): ``errors`` and ``tree``
use it too.
"""

from __future__ import annotations

import functools
import os
import re
import sysconfig
import traceback
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "keystr",
    "dtype_name",
    "tensor_text",
    "describe",
    "describe_type",
    "not_a_tensor",
    "fn_name",
    "diff_by_path",
    "first_line",
    "user_frame",
]

KeyPath = tuple[Any, ...]


def keystr(path: KeyPath, root: str = "") -> str:
    """A readable, unambiguous string for a key path: ``['params']['enc.0.weight']``.

    Used in every error message that names a leaf. Strings are quoted, indices are not,
    so ``('layers', 0, 'w')`` reads ``['layers'][0]['w']``.
    """
    parts = [root]
    for k in path:
        parts.append(f"[{k!r}]" if not isinstance(k, int) else f"[{k}]")
    return "".join(parts) or "<root>"


def dtype_name(dtype: torch.dtype | str) -> str:
    """``float32`` for ``torch.float32`` (a name from a file passes through)."""
    return str(dtype).removeprefix("torch.")


def tensor_text(shape: Iterable[int], dtype: torch.dtype | str) -> str:
    """``tensor(3, 4) float32``: a tensor's shape and dtype, also for one described in a file."""
    return f"tensor{tuple(shape)} {dtype_name(dtype)}"


def describe(x: Any, *, brief: bool = False) -> str:
    """A value as an error message names it.

    In prose (the default, after "got"): ``a tensor of shape (3,) float32``, ``a tuple of 2
    (Tensor, dict)``, ``an empty list``, ``a list``. ``brief=True`` is the form of a column in a tree
    difference: ``tensor(3,) float32``, ``float 2.5`` (a non-tensor with its value).
    """
    if brief:
        if isinstance(x, torch.Tensor):
            return tensor_text(x.shape, x.dtype)
        return f"{type(x).__name__} {x!r}"[:80]
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} {dtype_name(x.dtype)}"
    if isinstance(x, (list, tuple)) and not x:
        return f"an empty {type(x).__name__}"
    if isinstance(x, tuple):
        return f"a tuple of {len(x)} ({', '.join(type(v).__name__ for v in x)})"
    return f"a {type(x).__name__}"


def describe_type(cls: type) -> str:
    """A type by name; a NamedTuple (every optimizer state is one) also by its fields,
    which tells the user what it holds: ``ScaleByAdamState(count, mu, nu)``."""
    fields = getattr(cls, "_fields", None)
    if issubclass(cls, tuple) and isinstance(fields, tuple):
        return f"{cls.__name__}({', '.join(fields)})"
    return cls.__name__


def not_a_tensor(where: str, leaf: Any, advice: str) -> str:
    """``<where> has type float, not a tensor: <advice>``: one wording for every pytree
    leaf (params, example inputs, data) that must be a tensor and is not."""
    return f"{where} has type {type(leaf).__name__}, not a tensor: {advice}"


def fn_name(fn: Any) -> str:
    """A function as a message names it: ``function 'loss_fn'``, ``module MLP``, or ``the
    function`` for a lambda or another callable (a partial names the function it wraps)."""
    if isinstance(fn, functools.partial):
        return fn_name(fn.func)
    if isinstance(fn, (types.FunctionType, types.MethodType)) and fn.__name__ != "<lambda>":
        return f"function {fn.__qualname__!r}"
    if isinstance(fn, torch.nn.Module):
        return f"module {type(fn).__name__}"
    return "the function"


def diff_by_path(
    expected: Mapping[KeyPath, Any],
    actual: Mapping[KeyPath, Any],
    *,
    same: Callable[[Any, Any], bool] = lambda e, a: True,
    show: Callable[[Any], str] = lambda x: describe(x, brief=True),
    show_actual: Callable[[Any], str] | None = None,
    where: Callable[[KeyPath], str] = keystr,
    missing: str = "missing (expected {e})",
    unexpected: str = "unexpected leaf {a}",
    differs: str = "expected {e}, got {a}",
) -> list[str]:
    """One line per path where two trees (as ``{path: leaf}``) differ, ``"  <path>: ..."``.

    A path only in ``expected`` reads ``missing``, one only in ``actual`` reads
    ``unexpected``, one in both whose leaves are not ``same`` reads ``differs``; in each
    template ``{e}``/``{a}`` is the leaf as ``show`` (``show_actual`` for ``actual``'s
    leaves, if they are described differently, e.g. read from a file) renders it. Lines
    come in ``expected``'s order, then the unexpected paths in ``actual``'s order.
    """
    show_a = show_actual or show
    lines = []
    for p, e in expected.items():
        if p not in actual:
            lines.append(f"  {where(p)}: " + missing.format(e=show(e)))
        elif not same(e, actual[p]):
            lines.append(f"  {where(p)}: " + differs.format(e=show(e), a=show_a(actual[p])))
    for p, a in actual.items():
        if p not in expected:
            lines.append(f"  {where(p)}: " + unexpected.format(a=show_a(a)))
    return lines


def first_line(error: BaseException | str, limit: int = 300, *, fallback: str | None = None) -> str:
    """The first non-empty line of an error's text, cut to ``limit`` characters: torch's
    compile, export and backend errors run to pages. Without text: ``fallback``, by
    default the error's type name (for a message that does not name the type already)."""
    text = str(error)
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if fallback is None:
        fallback = type(error).__name__ if isinstance(error, BaseException) else ""
    return (lines[0] if lines else fallback)[:limit]


# "File "x.py", line 7, in f\n    code": how tracebacks, dynamo's "from user code" section
# and the stack traces torch keeps on graph nodes all name a frame.
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in \S+\n([^\n]*)')


def user_frame(error: BaseException | str) -> str:
    """`` at file.py:7 `if x.sum() > 0:` `` for the innermost frame of the user's code.

    ``error`` is an exception (frames named in its text, as dynamo names the user code it
    was tracing, win over its traceback) or a stack trace's text. Frames inside torch,
    lightfn and the standard library are skipped; empty if no frame is left.
    """
    text = error if isinstance(error, str) else str(error)
    skip = (
        os.path.dirname(torch.__file__) + os.sep,
        os.path.dirname(__file__) + os.sep,
        sysconfig.get_paths()["stdlib"] + os.sep,
    )
    mine = [(m[1], int(m[2]), m[3]) for m in _FRAME.finditer(text) if not m[1].startswith(skip)]
    if not mine and isinstance(error, BaseException):
        frames = traceback.extract_tb(error.__traceback__)
        mine = [(f.filename, f.lineno, f.line or "") for f in frames if not f.filename.startswith(skip)]
    if not mine:
        return ""
    filename, lineno, line = mine[-1]
    code = f" `{line.strip()}`" if line.strip() else ""
    return f" at {os.path.basename(filename)}:{lineno}{code}"
