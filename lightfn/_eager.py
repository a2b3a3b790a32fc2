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

:func:`global_rng_state` serves one more shortcut: a train step whose loss draws no random
numbers need not run inside ``rng_scope`` (a ``TorchFunctionMode``, which every torch call
in the loss passes through). Whether a call drew is read off torch's global generators:
a draw outside the scope advances them.
"""

from __future__ import annotations

from typing import Any

import torch

from . import tree

__all__ = ["plain_eager", "aligned_leaves", "global_rng_state", "set_global_rng_state", "same_rng_state"]

RngState = tuple[torch.Tensor, "list[torch.Tensor] | None"]


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


def global_rng_state() -> RngState:
    """The states of torch's global CPU generator and, once CUDA is initialized, of each
    CUDA device's (about 2 us on CPU: a 5 KB copy)."""
    return torch.default_generator.get_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def same_rng_state(a: RngState, b: RngState) -> bool:
    """Whether nothing drew from the global generators between snapshots ``a`` and ``b``.

    CUDA initialized in between counts as a draw: the call may have drawn on a device
    that ``a`` could not see (the caller then takes its careful path, which is always right).
    """
    if not torch.equal(a[0], b[0]) or (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def set_global_rng_state(state: RngState) -> None:
    """Put the global generators back to ``state`` (a :func:`global_rng_state`)."""
    torch.default_generator.set_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
