"""grad / value_and_grad / vmap / jit with JAX names and semantics, on torch.func.

``grad`` and ``value_and_grad`` differentiate a function with respect to a pytree of
tensors (``argnums`` picks which argument), with ``has_aux`` for returning metrics beside
the loss. ``jit`` is ``torch.compile`` with lightfn's defaults: the whole function in one
graph (``fullgraph=True``), the batch dimension dynamic so a short last batch does not
recompile, optional donation of the state, and a short error instead of a dynamo trace;
it lives in :mod:`lightfn._compile.jit` beside the ahead-of-time cache it can load from.

>>> import torch, lightfn as lf
>>> loss = lambda p, x: ((x @ p["w"]) ** 2).sum()
>>> g = lf.grad(loss)({"w": torch.ones(2)}, torch.eye(2))
>>> g["w"].tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.func

from . import tree
from ._compile.jit import Jitted, jit, jit_disabled
from .errors import StepError

__all__ = ["grad", "value_and_grad", "vmap", "jit", "Jitted", "jit_disabled"]


def _argnums_tuple(argnums: int | Sequence[int]) -> tuple[int, ...]:
    return (argnums,) if isinstance(argnums, int) else tuple(argnums)


def _check_differentiable(args: tuple[Any, ...], argnums: tuple[int, ...]) -> None:
    for i in argnums:
        for path, x in tree.leaves_with_path(args[i]):
            if not isinstance(x, torch.Tensor):
                raise StepError(
                    f"argument {i}{tree.keystr(path)} is a {type(x).__name__}; the differentiated argument must be "
                    "a pytree of floating-point tensors"
                )
            if not (x.is_floating_point() or x.is_complex()):
                raise StepError(
                    f"argument {i}{tree.keystr(path)} is {str(x.dtype).replace('torch.', '')}: only floating-point "
                    "leaves can be differentiated; keep integer state out of params (in buffers or extra)"
                )


def _check_output(out: Any, has_aux: bool) -> Any:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise StepError(
                f"with has_aux=True the function must return (loss, aux), got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, tuple) else "")
            )
        value = out[0]
    else:
        value = out
    if not isinstance(value, torch.Tensor):
        hint = " (returning (loss, metrics)? pass has_aux=True)" if isinstance(value, tuple) else ""
        raise StepError(f"the function must return a scalar loss tensor, got {type(value).__name__}{hint}")
    if value.numel() != 1:
        raise StepError(
            f"the loss must be a scalar tensor, got shape {tuple(value.shape)}; reduce it first (e.g. loss.mean())"
        )
    if not value.is_floating_point():
        raise StepError(f"the loss must be a floating-point tensor, got {value.dtype}")
    if value.dim() != 0:
        value = value.reshape(())
        out = (value, out[1]) if has_aux else value
    return out


def value_and_grad(fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable[..., Any]:
    """``fn`` -> a function returning ``(value, grads)`` (JAX order).

    With ``has_aux=True``, ``fn`` returns ``(loss, aux)`` and the result is
    ``((loss, aux), grads)``. ``grads`` has the structure of argument ``argnums`` (a tuple
    of such trees when ``argnums`` is a tuple).
    """
    nums = _argnums_tuple(argnums)

    def checked(*args: Any, **kwargs: Any) -> Any:
        return _check_output(fn(*args, **kwargs), has_aux)

    inner = torch.func.grad_and_value(checked, argnums=argnums, has_aux=has_aux)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_differentiable(args, nums)
        grads, value = inner(*args, **kwargs)
        return value, grads

    return wrapper


def autograd_value_and_grad(fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """:func:`value_and_grad` of argument 0 by plain ``torch.autograd.grad``.

    For callers that run plain eager (:func:`lightfn._eager.plain_eager`): there
    ``torch.func.grad_and_value`` costs about as much again as the backward itself (it wraps
    every tensor in a grad level), while autograd on detached leaves that require grad runs
    the same backward formulas. Results equal :func:`value_and_grad`'s: grads of leaves the
    value does not depend on are zeros, and the value and aux come back detached. The function it
    returns gives ``None``, without calling ``fn``, when a leaf already requires grad: there
    ``torch.func`` would also connect the result to the caller's autograd graph, so the
    caller falls back to :func:`value_and_grad`.
    """

    def run(diff: Any, *args: Any) -> Any:
        leaves, treedef = tree.flatten(diff)
        if not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves):
            _check_differentiable((diff,), (0,))  # names the leaf
            return None  # complex leaves: torch.func's path
        if any(x.requires_grad for x in leaves):
            return None
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in leaves]
            out = _check_output(fn(tree.unflatten(treedef, inputs), *args), has_aux)
            value = out[0] if has_aux else out
            if value.requires_grad:
                grads = torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)
            else:  # the value does not depend on the leaves at all
                grads = tuple(torch.zeros_like(x) for x in leaves)
        detached = tree.map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, out)
        return detached, tree.unflatten(treedef, grads)

    return run


def grad(fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable[..., Any]:
    """``fn`` -> a function returning the gradient of its scalar output.

    With ``has_aux=True`` returns ``(grads, aux)`` like ``jax.grad``.
    """
    vg = value_and_grad(fn, argnums=argnums, has_aux=has_aux)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        value, grads = vg(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper


def vmap(
    fn: Callable[..., Any],
    in_axes: int | None | Sequence[Any] = 0,
    out_axes: Any = 0,
    *,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """Vectorize ``fn`` over a leading axis (``torch.func.vmap`` with JAX's argument names).

    ``in_axes`` gives, per argument, the axis to map over (or ``None`` to broadcast); a
    pytree prefix of the arguments works as in JAX.
    """
    in_dims = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    return torch.func.vmap(fn, in_dims=in_dims, out_dims=out_axes, randomness=randomness, chunk_size=chunk_size)
