"""How an AOT artifact is called: flat tensor inputs in, flat tensors out.

An artifact (:mod:`lightfn._compile.aot`) is a graph over a flat list of tensors. A call
of the function it was built from is mapped onto it here: :class:`Inputs` flattens the
arguments (tensor leaves are graph inputs, other leaves are constants baked into the graph
and its key), the output tree is stored as a small JSON spec (``_encode``) and rebuilt
around the graph's outputs (:func:`decoder`). :class:`CachedStep` is a loaded artifact,
callable like the function.

Per call, the step a cached call goes to is found by :func:`call_key`: one flatten and a
tuple of each leaf's shape, dtype, device, layout and type, so a loaded step costs tens of
microseconds over its kernels rather than the hundreds a full :class:`Inputs` and its
signature take (a 1 ms step is a third overhead otherwise).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import tree
from .key import fingerprint

__all__ = ["Unsupported", "Inputs", "CachedStep", "call_key", "decoder"]


class Unsupported(Exception):
    """The function cannot be cached ahead of time; ``str(e)`` says why in a few words."""


class Inputs:
    """The call's arguments as flat leaves: tensors become graph inputs, the rest constants."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_argnums: Sequence[int], static: bool) -> None:
        self.arg_defs = []
        self.leaves: list[Any] = []
        self.dynamic: list[bool] = []  # per tensor: dim 0 dynamic
        for i, a in enumerate((*args, kwargs)):
            ls, d = tree.flatten(a)
            self.arg_defs.append(d)
            self.leaves.extend(ls)
            dyn = not static and i in dynamic_argnums
            self.dynamic.extend(dyn and isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] >= 2 for x in ls)
        self.is_tensor = [isinstance(x, torch.Tensor) for x in self.leaves]
        self.tensors = [x for x in self.leaves if isinstance(x, torch.Tensor)]
        self.dynamic = [d for d, t in zip(self.dynamic, self.is_tensor) if t]
        self.nargs = len(args)

    def signature(self) -> tuple[Any, ...]:
        """A cheap hashable stand-in for the key's input part, for a per-process lookup."""
        parts: list[Any] = [torch.is_grad_enabled(), torch.is_autocast_enabled(), *self.arg_defs]
        dyn = iter(self.dynamic)
        for x, is_t in zip(self.leaves, self.is_tensor):
            if is_t:
                d = next(dyn)
                parts.append((d, x.shape[1:] if d else x.shape, x.dtype, x.device, x.is_contiguous(), x.requires_grad))
            else:
                try:
                    hash(x)
                except TypeError:
                    raise Unsupported(f"a non-tensor input of type {type(x).__name__} is not hashable") from None
                parts.append((type(x), x))
        return tuple(parts)

    def describe(self) -> list[Any]:
        out: list[Any] = [str(d) for d in self.arg_defs]
        dyn = iter(self.dynamic)
        for x, is_t in zip(self.leaves, self.is_tensor):
            if is_t:
                if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
                    raise Unsupported(f"an input is a {type(x).__name__}, not a plain tensor")
                if x.requires_grad and torch.is_grad_enabled():
                    # The artifact is a forward graph: autograd through it would silently stop.
                    raise Unsupported("an input requires grad (the cached graph has no backward)")
                shape = list(x.shape)
                if next(dyn):
                    shape[0] = "dyn"
                out.append(["t", shape, str(x.dtype), str(x.device), x.is_contiguous()])
            else:
                out.append(["c", fingerprint(x)])
        return out

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        it = iter(tensors)
        full = [next(it) if is_t else x for x, is_t in zip(self.leaves, self.is_tensor)]
        parts, start = [], 0
        for d in self.arg_defs:
            parts.append(tree.unflatten(d, full[start:start + d.num_leaves]))
            start += d.num_leaves
        return tuple(parts[:-1]), parts[-1]


def call_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, list[Any]]:
    """``(key, leaves)``: an exact description of this call's inputs (everything
    :meth:`Inputs.signature` distinguishes, with every dim exact) and its flat leaves.

    Exact shapes make it stricter than a signature (one key per batch size), so a key seen
    before always maps to the same artifact. Raises ``TypeError`` for an unhashable
    constant when the key is hashed."""
    leaves, spec = tree.flatten((args, kwargs))
    meta = tuple([(type(x), x.shape, x.dtype, x.device, x.is_contiguous(), x.requires_grad)
                  if isinstance(x, torch.Tensor) else (type(x), x) for x in leaves])
    return (spec, torch.is_grad_enabled(), torch.is_autocast_enabled(), meta), leaves


def _encode(obj: Any, arg_defs: list[Any], out: list[torch.Tensor]) -> Any:
    """A JSON description of the output tree; its tensors are appended to ``out``."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return "T"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"c": obj}
    if type(obj) is dict and all(isinstance(k, str) for k in obj):
        return {"d": [[k, _encode(v, arg_defs, out)] for k, v in obj.items()]}
    if type(obj) in (list, tuple):
        return {"l" if type(obj) is list else "t": [_encode(v, arg_defs, out) for v in obj]}
    structure = tree.structure(obj)
    for i, d in enumerate(arg_defs):
        if structure == d:
            leaves = tree.leaves(obj)
            if all(isinstance(x, torch.Tensor) for x in leaves):
                out.extend(leaves)
                return {"a": i}
    raise Unsupported(f"the function returns a {type(obj).__qualname__} unlike any input's structure")


def decoder(spec: Any, arg_defs: list[Any]) -> Callable[[Any], Any]:
    """``spec`` (from ``_encode``) as a function of an iterator over the graph's outputs:
    built once per input structure, not walked at every call."""
    if spec == "T":
        return next
    (tag, v), = spec.items()
    if tag == "c":
        return lambda it: v
    if tag == "d":
        items = [(k, decoder(s, arg_defs)) for k, s in v]
        return lambda it: {k: f(it) for k, f in items}
    if tag in ("l", "t"):
        parts = [decoder(s, arg_defs) for s in v]
        if tag == "l":
            return lambda it: [f(it) for f in parts]
        return lambda it: tuple([f(it) for f in parts])
    d = arg_defs[v]
    n = d.num_leaves
    return lambda it: tree.unflatten(d, list(itertools.islice(it, n)))


class CachedStep:
    """A loaded artifact, callable like the function it was built from (same arguments)."""

    def __init__(self, model: Any, out_spec: Any, *, path: Path, dynamic_argnums: Sequence[int], static: bool) -> None:
        self.model = model
        self.out_spec = out_spec
        self.path = path
        self.dynamic_argnums = tuple(dynamic_argnums)
        self.static = static

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = Inputs(args, kwargs, self.dynamic_argnums, self.static)
        return self.run(inputs.tensors, decoder(self.out_spec, inputs.arg_defs))

    def run(self, tensors: Sequence[torch.Tensor], decode: Callable[[Any], Any]) -> Any:
        """The graph on ``tensors``, its outputs rebuilt by ``decode`` (:func:`decoder`)."""
        return decode(iter(self.model.run(list(tensors))))
