"""Batched inference: run a pure function over a dataset, outputs in input order.

:func:`predict` is the inference counterpart of a training loop: no gradients, batches
moved to the device, per-batch outputs concatenated along dim 0 and brought back to the
CPU (ready for ``.numpy()``). It is a loop a user could write; it exists so the ragged last
batch, device moves and output concatenation over pytrees are done once, correctly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from . import tree
from ._device import default_device, resolve_device
from .data import ArrayLoader, DataError
from .errors import StepError

__all__ = ["predict", "default_device"]


def predict(
    fn: Callable[..., Any],
    data: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str = "auto",
    jit: bool = False,
    params: tree.PyTree = None,
    output_device: torch.device | str | None = "cpu",
) -> Any:
    """``fn`` applied to every batch of ``data``, outputs concatenated along dim 0.

    Args:
        fn: ``fn(batch) -> outputs`` (or ``fn(params, batch)`` when ``params`` is given);
            outputs are a tensor or a pytree of tensors whose dim 0 is the batch.
        data: what to run over, in order:
            - a tensor, or a dict/tuple/NamedTuple of tensors sharing their leading size:
              sliced along dim 0 into batches of ``batch_size`` (the last one ragged), each
              batch having the same structure;
            - any other iterable of batches: a list, a generator, a ``DataLoader`` or an
              :class:`~lightfn.data.ArrayLoader` (not shuffled: outputs must line up with
              the inputs; a list is always a sequence of batches, use a tuple for several
              arrays).
        batch_size: rows per batch when ``data`` is sliced here (ignored for iterables).
        device: where ``fn`` runs: ``"auto"`` picks CUDA, else MPS, else the CPU. Batches and
            ``params`` are moved there; tensors ``fn`` closes over are *not* (put them on
            the device yourself, or pass them as ``params`` and let predict move them).
        jit: compile ``fn`` with ``torch.compile(dynamic=True)`` (one graph for every batch
            size, the ragged last one included; the first batch pays the compile).
        params: optional pytree passed as ``fn``'s first argument, moved to ``device``.
        output_device: where the concatenated outputs go; ``"cpu"`` (default) frees device
            memory batch by batch and is what ``.numpy()`` needs; ``None`` keeps them on
            ``device``.

    Runs under ``torch.no_grad()`` (not ``inference_mode``, so the outputs are ordinary
    tensors you may modify in place).

    >>> import torch
    >>> w = torch.ones(3, 2)
    >>> predict(lambda x: x @ w, torch.ones(5, 3), batch_size=2, device="cpu").shape
    torch.Size([5, 2])
    """
    dev = resolve_device(device)
    out_dev = None if output_device is None else torch.device(output_device)
    run = torch.compile(fn, dynamic=True) if jit else fn
    if params is not None:
        params = tree.to_device(params, dev)
    outputs: list[list[torch.Tensor]] = []
    treedef = None
    with torch.no_grad():
        for i, batch in enumerate(_batches(data, batch_size)):
            batch = tree.to_device(batch, dev)
            out = run(batch) if params is None else run(params, batch)
            leaves_with_path = tree.leaves_with_path(out)
            for path, leaf in leaves_with_path:
                if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
                    what = "a 0-d tensor" if isinstance(leaf, torch.Tensor) else f"a {type(leaf).__name__}"
                    raise StepError(
                        f"predict concatenates outputs along dim 0, but output {tree.keystr(path)} of batch {i} is "
                        f"{what}: return per-example tensors (a leading batch dimension), reduce afterwards."
                    )
            if treedef is None:
                treedef = tree.structure(out)
            elif tree.structure(out) != treedef:
                raise StepError(f"fn returned a different output structure for batch {i} than for batch 0:\n  {tree.structure(out)}\n  vs {treedef}")
            outputs.append([leaf if out_dev is None else leaf.to(out_dev) for _, leaf in leaves_with_path])
    if treedef is None:
        raise DataError("predict got no batches: data is empty")
    return tree.unflatten(treedef, [torch.cat(column) for column in zip(*outputs)])


def _batches(data: Any, batch_size: int) -> Iterator[Any]:
    if isinstance(data, (torch.Tensor, Mapping, tuple)):
        yield from _slices(data, batch_size)
        return
    if isinstance(data, ArrayLoader) and data.shuffle:
        raise DataError("predict needs outputs in input order, but the ArrayLoader shuffles: build it with shuffle=False")
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        raise DataError("predict needs outputs in input order, but the DataLoader shuffles: build it with shuffle=False")
    if not isinstance(data, Iterable):
        raise DataError(
            f"predict takes a tensor, a dict/tuple of tensors or an iterable of batches; got {type(data).__name__}"
        )
    yield from data


def _slices(data: Any, batch_size: int) -> Iterator[Any]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    leaves = tree.leaves_with_path(data)
    if not leaves:
        raise DataError(f"predict got no tensors in data ({type(data).__name__})")
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            kind = "a 0-d tensor" if isinstance(leaf, torch.Tensor) else f"a {type(leaf).__name__}"
            raise DataError(f"data leaf {tree.keystr(path)} is {kind}: every leaf needs a leading (row) dimension to slice")
    first_path, n = leaves[0][0], leaves[0][1].shape[0]
    for path, leaf in leaves[1:]:
        if leaf.shape[0] != n:
            raise DataError(f"data leaves disagree on the number of rows: {tree.keystr(first_path)} has {n}, {tree.keystr(path)} has {leaf.shape[0]}")
    for start in range(0, n, batch_size):
        yield tree.map(lambda t: t[start : start + batch_size], data)
