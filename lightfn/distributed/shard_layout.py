"""The flat layout of a fully sharded params tree: where each leaf lives, which slice a rank holds.

Every param is flattened and all are concatenated, in flatten order, into one flat vector
of ``total`` elements, zero padded to ``shard_size * world_size``; rank ``r`` holds elements
:meth:`ShardLayout.bounds` ``(r)``. The same arithmetic serves the sharded step, its
optimizer, checkpoints and resharding to another world size, so it lives here once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .. import tree
from .._diagnostics import describe
from ..errors import DistributedError

__all__ = ["ShardLayout", "layout_of", "shard_size_of"]


def shard_size_of(total: int, world_size: int) -> int:
    """Elements per rank when ``total`` elements are cut for ``world_size`` ranks (at least 1)."""
    return max(1, -(-total // world_size))


@dataclasses.dataclass(frozen=True, eq=False)
class ShardLayout:
    """Where each param lives in the flat vector, and how it is cut into shards.

    ``paths``/``shapes`` list the params' leaves in flatten order; the flat vector holds
    them back to back (``total`` elements), zero padded to ``shard_size * world_size``.
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    world_size: int
    # The params tree with leaf i replaced by the int i: rebuilding through lf.tree.map
    # traces under dynamo, whose pytree polyfill refuses a real optree treedef.
    skeleton: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def _identity(self) -> tuple[Any, ...]:
        return (self.treedef, self.paths, self.shapes, self.dtype, self.world_size)

    def __eq__(self, other: object) -> bool:
        # One layout object is shared by every node a step builds from it: the identity test
        # settles their comparison without reading treedef, which torch 2.11's dynamo cannot
        # compare while walking several trees (its pytree polyfill compares node metadata).
        if self is other:
            return True
        if not isinstance(other, ShardLayout):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def shard_size(self) -> int:
        return shard_size_of(self.total, self.world_size)

    @property
    def padded(self) -> int:
        return self.shard_size * self.world_size

    def bounds(self, rank: int) -> tuple[int, int]:
        """Rank ``rank``'s ``[lo, hi)`` elements of the padded flat vector: the one rule for
        which slice a rank holds (in steps, checkpoints and resharding)."""
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def cut(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s shard of the padded flat vector ``flat``, as its own tensor."""
        lo, hi = self.bounds(rank)
        return flat[lo:hi].clone()

    def slice(self, leaves: Any, lo: int, hi: int) -> torch.Tensor:
        """Elements ``[lo, hi)`` of the padded flat vector of the params ``leaves`` (in
        flatten order), read from the leaves that overlap the range, without a full-size
        copy; traceable."""
        leaves = list(leaves)
        pieces, off = [], 0
        for x, n in zip(leaves, self.numels):
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                pieces.append(x.reshape(-1)[a - off : b - off])
            off += n
        missing = (hi - lo) - sum(p.numel() for p in pieces)
        if missing > 0:
            pieces.append(torch.zeros(missing, dtype=leaves[0].dtype, device=leaves[0].device))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of a full flat vector as the params' leaves (padding ignored); traceable."""
        pieces = torch.split(flat[: self.total], list(self.numels))
        return tuple(p.view(s) for p, s in zip(pieces, self.shapes))

    def build(self, leaves: Any) -> Any:
        """The params pytree from its leaves (in flatten order); traceable."""
        leaves = list(leaves)
        return tree.map(lambda i: leaves[i], self.skeleton)

    def unflatten(self, flat: torch.Tensor) -> Any:
        """The params pytree viewed from a full flat vector."""
        return self.build(self.split(flat))

    def with_world_size(self, world_size: int) -> "ShardLayout":
        return dataclasses.replace(self, world_size=world_size)

    def flatten(self, params: Any) -> torch.Tensor:
        """The params pytree (or its leaves, in flatten order) as one padded flat vector; traceable."""
        leaves = tree.leaves(params)
        flat = torch.cat([x.reshape(-1) for x in leaves]) if leaves else torch.zeros(0, dtype=self.dtype)
        return torch.nn.functional.pad(flat, (0, self.padded - self.total))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (for checkpoint indexes)."""
        return {
            "paths": list(self.paths),
            "shapes": [list(s) for s in self.shapes],
            "dtype": str(self.dtype).replace("torch.", ""),
            "total": self.total,
            "world_size": self.world_size,
            "shard_size": self.shard_size,
            "padding": self.padded - self.total,
        }


def layout_of(params: Any, world_size: int) -> ShardLayout:
    """The layout of ``params`` cut for ``world_size`` ranks; refuses what cannot be
    sharded (an empty tree, non-floating leaves, mixed dtypes), naming the leaf."""
    pairs = tree.leaves_with_path(params)
    if not pairs:
        raise DistributedError("cannot shard an empty params tree")
    dtypes = {}
    for path, x in pairs:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise DistributedError(f"params{tree.keystr(path)} is {describe(x)}: fully_sharded shards floating-point tensors only")
        dtypes.setdefault(x.dtype, path)
    if len(dtypes) > 1:
        (d0, p0), (d1, p1) = list(dtypes.items())[:2]
        raise DistributedError(
            f"fully_sharded needs one dtype for all params, but params{tree.keystr(p0)} is {d0} and "
            f"params{tree.keystr(p1)} is {d1}; cast them to one dtype (lf.tree.cast)"
        )
    return ShardLayout(
        treedef=tree.structure(params),
        paths=tuple(tree.keystr(p) for p, _ in pairs),
        shapes=tuple(tuple(x.shape) for _, x in pairs),
        dtype=next(iter(dtypes)),
        world_size=world_size,
        skeleton=tree.unflatten(tree.structure(params), range(len(pairs))),
    )
