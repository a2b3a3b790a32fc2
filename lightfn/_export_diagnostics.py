"""Why an inference function cannot be exported, said in terms of the user's code.

``torch.export`` reports a failed trace as pages of internals. :mod:`lightfn.export` calls
these checks before, during and after tracing so the user gets one or two lines: what the
function does that an exported graph cannot keep (a tensor's value in Python control flow,
``.item()``, ``print``, appending to a list, a fixed batch size), where in their code, and
what to write instead. The torch error stays chained for the whole story.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import io
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch

from . import tree
from ._diagnostics import first_line, fn_name, not_a_tensor, user_frame
from .errors import ExportError

__all__ = [
    "check_tensors",
    "watch_side_effects",
    "explain_trace_failure",
    "refuse_item",
    "check_runs_at_batch_one",
]


def check_tensors(args: Any, root: str) -> None:
    for path, leaf in tree.leaves_with_path(args):
        if not isinstance(leaf, torch.Tensor):
            raise ExportError(not_a_tensor(
                tree.keystr(path, root), leaf,
                "every example input (and params leaf) must be a tensor or a pytree of tensors. Close over "
                "other values instead, e.g. export(lambda x: fn(x, 3), x).",
            ))


def refuse_item(fn: Any, program: torch.export.ExportedProgram) -> None:
    """``.item()`` traces (into an unbacked symbol) but means a host sync and a Python
    number inside a deployed graph, which ONNX and most runtimes refuse: say so now."""
    item_ops = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in item_ops:
            at = user_frame(node.meta.get("stack_trace") or "")
            raise ExportError(
                f"{fn_name(fn)} calls .item(){at}: it turns a tensor into a Python number, a host sync that "
                "an exported graph cannot keep. Keep the value a tensor (x * s, not x * s.item()); "
                "use torch.where(cond, a, b) or torch.cond(pred, true_fn, false_fn, operands) to branch."
            )


def check_runs_at_batch_one(fn: Any, program: torch.export.ExportedProgram, args: tuple[Any, ...]) -> None:
    try:
        with torch.no_grad():
            program.module()(*args)
    except Exception as e:
        raise ExportError(
            f"{fn_name(fn)} was traced at batch 2 (a batch of 1 would be fixed as a constant by torch.export) "
            f"but the program fails at batch 1: {first_line(e)}. Give an example batch of 2 or more, or "
            "pass dynamic_batch=False."
        ) from e


def explain_trace_failure(fn: Any, e: BaseException, strict: bool) -> str:
    """One or two lines: why ``fn`` could not be traced and what to change."""
    msg = str(e)
    low = msg.lower()
    at = user_frame(e)
    if "data-dependent" in low or "data dependent" in low:
        return (
            f"{fn_name(fn)} cannot be traced: it uses a tensor's value in Python control flow{at} "
            "(if/while/bool()/int()/.item() on a tensor), but an exported program is one graph for "
            "every input. Use torch.where(cond, a, b) to choose values, or "
            "torch.cond(pred, true_fn, false_fn, operands) to choose branches."
        )
    if "constraints violated" in low or "specialized" in low:
        return (
            f"{fn_name(fn)} fixes the batch size{at} (e.g. x.view(2, -1), or a size from x.shape reused as a "
            "constant), so dim 0 cannot be dynamic. Write shapes with -1 or x.shape[0] "
            "(x.reshape(x.shape[0], -1)), or pass dynamic_batch=False."
        )
    return (
        f"torch.export could not trace {fn_name(fn)}{at}: {first_line(e)}. Try strict={not strict} "
        "or simplify the function; torch's full report is the chained exception."
    )


_MUTABLE = (list, dict, set, bytearray, collections.deque)


def container_sizes(fn: Any, depth: int = 3) -> list[tuple[str, Any, int]]:
    """(name, object, len) of the lists/dicts/sets ``fn`` (and the Python functions it
    calls by name, a few levels deep) can reach through globals and closures, to notice
    appends made while tracing."""
    found: dict[int, tuple[str, Any, int]] = {}
    seen: set[int] = set()

    def visit(f: Any, level: int) -> None:
        if isinstance(f, functools.partial):
            visit(f.func, level)
            return
        if not isinstance(f, (types.FunctionType, types.MethodType)) or id(f) in seen or level > depth:
            return
        seen.add(id(f))
        try:
            cv = inspect.getclosurevars(f)
        except (TypeError, ValueError):
            return
        for name, value in {**cv.globals, **cv.nonlocals}.items():
            if isinstance(value, _MUTABLE):
                found[id(value)] = (name, value, len(value))
            elif isinstance(value, (types.FunctionType, functools.partial)):
                visit(value, level + 1)

    visit(fn, 0)
    return list(found.values())


@contextlib.contextmanager
def watch_side_effects(fn: Any) -> Iterator[None]:
    """Trace inside this: raise :class:`ExportError` if ``fn`` printed or grew a list,
    dict or set it reaches (effects that run once at export time, not in the program).

    torch prints partial graphs to stderr on a failed trace: they are held back (the
    chained exception keeps the whole story) and only a good trace's warnings are shown.
    """
    out, err = io.StringIO(), io.StringIO()
    before = container_sizes(fn)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield
    sys.stderr.write(err.getvalue())
    printed = out.getvalue().strip()
    if printed:
        raise ExportError(
            f"{fn_name(fn)} printed while being traced ({first_line(printed, 60)!r}): print and other Python side effects run "
            "once at export time and are not part of the exported program. Move them out of the "
            "function (print its outputs instead)."
        )
    for name, obj, size in before:
        if len(obj) != size:
            raise ExportError(
                f"{fn_name(fn)} changed {name!r} (a {type(obj).__name__}, {size} -> {len(obj)} items) while being "
                "traced: side effects such as appending to a list run once at export time and are not "
                "part of the exported program. Return the value as an output instead."
            )
