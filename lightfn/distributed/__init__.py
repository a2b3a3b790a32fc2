"""lightfn.distributed: map the pure step over processes launched by torchrun.

- :func:`init` turns torchrun's environment into a :class:`Mesh` (a no-op single-process
  mesh under plain ``python``); :func:`shutdown` ends the run (automatic at exit);
  :func:`rank`, :func:`world_size`, :func:`is_main`,
  :func:`barrier`, :func:`broadcast`, :func:`all_agree`, :func:`check_same_structure`.
- :func:`data_parallel`: replicated params, per-rank batch shards, gradients averaged in one
  flat bucket inside the compiled step; :func:`replicate_state`, :func:`reduce_metrics`,
  and :func:`all_reduce_mean` for hand-written steps.
- :func:`fully_sharded`: ZeRO-3; :func:`fully_sharded_eval` evaluates its sharded states;
  :func:`shard_state`, :func:`unshard_state`, :func:`gather_params`.
- :func:`save_sharded` / :func:`load_sharded`: one safetensors file per rank plus an index,
  restorable on a different world size; :func:`consolidate` (or ``lf.load(folder)``) reads
  one back in a plain process as the full state.
- :class:`Strategy`: ``lf.fit(..., strategy="ddp" | "fsdp" | Strategy(...))`` runs the fit
  loop on every rank (:mod:`lightfn.fit._processes`).
"""

from ._lifetime import shutdown
from .collectives import all_reduce_mean
from .data_parallel import data_parallel, reduce_metrics, replicate_state, shard_batch
from .fully_sharded import FullyShardedStep, ShardedParams, fully_sharded, gather_params, shard_bytes, shard_state, unshard_state, unshard_tree
from .host import all_agree, any_rank, barrier, broadcast, check_same_structure, guard
from .mesh import (
    Mesh,
    init,
    is_main,
    launched,
    rank,
    require_launched,
    single_process_mesh,
    world_size,
)
from .shard_layout import ShardLayout
from .sharded_checkpoint import load_sharded, save_sharded
from .sharded_eval import FullyShardedEval, fully_sharded_eval
from .sharded_folder import consolidate
from .strategy import Strategy

__all__ = [
    "Mesh",
    "init",
    "shutdown",
    "launched",
    "require_launched",
    "single_process_mesh",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "broadcast",
    "all_agree",
    "any_rank",
    "check_same_structure",
    "guard",
    "all_reduce_mean",
    "data_parallel",
    "replicate_state",
    "reduce_metrics",
    "shard_batch",
    "fully_sharded",
    "FullyShardedStep",
    "fully_sharded_eval",
    "FullyShardedEval",
    "ShardedParams",
    "ShardLayout",
    "shard_state",
    "unshard_state",
    "unshard_tree",
    "gather_params",
    "shard_bytes",
    "save_sharded",
    "load_sharded",
    "consolidate",
    "Strategy",
]
