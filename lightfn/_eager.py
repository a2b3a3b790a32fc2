"""Is this call running as plain eager torch? The question behind lightfn's eager shortcuts.

A step built from ``torch.func`` is what ``lf.jit`` compiles, what ``lf.ensemble`` maps
with ``vmap`` and what capture tools trace. Run eagerly, the same functional code pays for
its generality on every call: ``torch.func.grad_and_value`` wraps every tensor in a grad
level, and an optimizer written leaf by leaf issues one Python call per op and leaf. Where
nothing traces or transforms the call, cheaper equivalents compute the same numbers (plain
``torch.autograd.grad``; the ``torch._foreach_*`` ops, which on CPU run the very same
per-tensor kernels). :func:`plain_eager` says when those may be used: never while dynamo
traces, inside a ``torch.func`` transform, or under a dispatch mode (``make_fx``, fake
tensors), so compiled and transformed steps keep tracing the functional form unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from . import tree

__all__ = ["plain_eager", "aligned_leaves"]


def plain_eager() -> bool:
    """True when torch ops run directly: no dynamo trace, no ``torch.func`` transform, no dispatch mode."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._functorch.maybe_current_level() is None
        and torch._C._len_torch_dispatch_stack() == 0
    )


def aligned_leaves(*trees: Any) -> tuple[Any, list[list[torch.Tensor]]] | None:
    """``(treedef, [leaves of each tree])`` when every tree has the first one's structure and
    all leaves are tensors; else ``None`` (the caller then takes its leaf-by-leaf path,
    which also reports what is wrong). Dtypes may differ: on CPU each ``_foreach`` op runs
    the per-tensor op on each position, with the same type promotion."""
    first, treedef = tree.flatten(trees[0])
    out = [first]
    for t in trees[1:]:
        leaves, other = tree.flatten(t)
        if other != treedef:
            return None
        out.append(leaves)
    if not all(isinstance(x, torch.Tensor) for leaves in out for x in leaves):
        return None
    return treedef, out
