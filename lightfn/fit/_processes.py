"""fit's multi-process policy: what ``lf.fit(..., strategy="ddp" | "fsdp")`` changes, in
one object fit consults.

It builds on the primitives of :mod:`lightfn.distributed` (which knows nothing of fit);
the config is :class:`~lightfn.distributed.Strategy`. ``fit`` stays a single-process loop;
:func:`setup_processes` returns a :class:`Processes` that tells it, at the few places where
processes matter:

- the step and state: ``"ddp"`` wraps an ``lf.train_step`` with :func:`data_parallel` and
  broadcasts rank 0's state; ``"fsdp"`` wraps it with :func:`fully_sharded` and shards the
  state (:func:`shard_state`); the eval step is wrapped to match (rank-folded RNG; for fsdp,
  params all-gathered inside it). A step already wrapped by ``data_parallel`` /
  ``fully_sharded`` (``lf.jit``-ed or not) is recognised and used as it is.
- the data: each rank gets its rows of every global batch (:meth:`ArrayLoader.shard`, or
  the rows of each batch of a DataLoader / list; a DataLoader whose sampler is a
  ``DistributedSampler`` is already per rank and kept), so every sample is seen once per
  epoch and one process sees exactly the single-process batches.
- metrics: per-rank until a log point, then averaged (step values) or summed (the epoch
  and validation accumulators ``[sum_1..sum_M, n]``, so means stay exactly weighted, and
  the totals of ``lf.metrics.Sum`` states, so an F1 or a perplexity covers every rank).
- checkpoints: ``"ddp"`` writes from rank 0 only; ``"fsdp"`` writes each checkpoint path as
  a folder of per-rank safetensors files plus ``index.json`` (:func:`save_sharded`), or,
  with ``Strategy("fsdp", gather_checkpoints=True)``, as one ordinary fit checkpoint file
  written by rank 0. ``resume_from`` reads either kind. The metric sums are reduced before a
  save so a resumed run's epoch means cover every rank.
- the result: a state fit sharded is gathered again before fit returns it.

Every rank takes the same decisions because the metrics they decide on are reduced first
and ranks vote each step (:meth:`Processes.vote`: stop and SIGTERM flags OR-ed, one shared
clock for ``max_time`` and ``ModelCheckpoint(train_time_interval=...)``), a CPU all-reduce
on a gloo control group that fit makes, so NCCL runs do not stall on it.

Over ~300 lines: every place where processes change what fit does (data, metrics, votes,
checkpoints, the state returned) is one policy and is kept in one object on purpose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .. import tree
from ..data import ArrayLoader
from ..errors import FitError
from ..state import TrainState
from ..step import EvalStep, TrainStep
from ..distributed.collectives import sum_over_ranks
from ..distributed.data_parallel import RankFoldedLoss, data_parallel, reduce_metrics, replicate_state
from ..distributed.fully_sharded import ShardedParams, fully_sharded, shard_state, unshard_state
from ..distributed.sharded_eval import fully_sharded_eval
from ..distributed.host import guard, host_all_reduce
from ..distributed.mesh import Mesh, init, is_main, require_launched, single_process_mesh
from ..distributed.rank_data import RankBatches, has_distributed_sampler
from ..distributed.strategy import Strategy
from ..distributed.sharded_checkpoint import INDEX_NAME, cut_full, full_template, load_sharded, read_index, save_sharded
from ._run import Run, load_run, run_metadata, save_run, to_tree
from ._steps import StepKind, classify

__all__ = ["Processes", "setup_processes", "control_group"]

_log = logging.getLogger("lightfn.fit")


def _resolve(strategy: str | Strategy | None, kind: StepKind) -> Strategy | None:
    if isinstance(strategy, str):
        strategy = Strategy(name=strategy)
    elif strategy is not None and not isinstance(strategy, Strategy):
        raise FitError(f"strategy must be None, 'ddp', 'fsdp' or an lf.distributed.Strategy, got {type(strategy).__name__}")
    wrapped = kind.distributed
    if wrapped is None:
        return strategy
    if strategy is not None and strategy.name != wrapped:
        raise FitError(
            f"strategy={strategy.name!r}, but the step is already wrapped for {wrapped!r}; pass the plain "
            "lf.train_step with strategy=..., or the wrapped step without it"
        )
    return strategy or Strategy(name=wrapped)


# ----------------------------------------------------------------------------- the policy


@dataclasses.dataclass(frozen=True, kw_only=True)
class Processes:
    """fit's view of the processes (see the module docstring); inactive for one process."""

    mesh: Mesh
    strategy: Strategy | None
    step: Any
    state: Any
    eval_step: Any
    sharded_by_fit: bool = False
    # A gloo group over the mesh's ranks for fit's per-step stop/preemption vote: a CPU
    # all-reduce that never waits for the GPU stream (NCCL runs keep dispatching ahead).
    # Created per fit call and destroyed when it ends (see guard).
    control: Any = None

    @property
    def active(self) -> bool:
        return self.strategy is not None

    @property
    def fsdp(self) -> bool:
        return self.strategy is not None and self.strategy.name == "fsdp"

    @property
    def is_main(self) -> bool:
        """This process writes files: rank 0 of the mesh, or (no strategy) of any process
        group the user set up for a hand-written distributed step."""
        return self.mesh.is_main if self.active else is_main()

    def device(self, device: torch.device) -> torch.device:
        """The device fit places state and batches on: this rank's (e.g. ``cuda:<local rank>``)."""
        if self.active and device.type == self.mesh.device.type:
            return self.mesh.device
        return device

    def shard_data(self, data: Any, what: str) -> Any:
        """This rank's part of ``data`` (unchanged for one process)."""
        mesh = self.mesh
        if data is None or not self.active or mesh.world_size == 1:
            return data
        if isinstance(data, ArrayLoader):
            if data.world_size != 1:
                if (data.rank, data.world_size) != (mesh.rank, mesh.world_size):
                    raise FitError(
                        f"{what} is shard {data.rank} of {data.world_size}, but this is rank {mesh.rank} of "
                        f"{mesh.world_size}; pass the unsharded loader (fit shards it)"
                    )
                return data
            ragged = data.num_samples % data.batch_size
            if not data.drop_last and 0 < ragged < mesh.world_size:
                raise FitError(
                    f"{what}'s last batch has {ragged} rows, fewer than the {mesh.world_size} ranks, so a rank would "
                    "get none; use drop_last=True or a dataset size that leaves at least one row per rank"
                )
            return data.shard(mesh.rank, mesh.world_size)
        if isinstance(data, DataLoader) and has_distributed_sampler(data):
            return data  # already this rank's samples
        return RankBatches(data, mesh.rank, mesh.world_size, what)

    @property
    def voting(self) -> bool:
        """Ranks vote each step on a shared control group: a fit with a strategy over several
        processes (the control group exists exactly then)."""
        return self.control is not None

    def vote(self, flags: tuple[bool, ...], elapsed: float, device: torch.device) -> tuple[tuple[bool, ...], float]:
        """Every rank's flags OR-ed, and the largest of their clocks (``elapsed``), so all
        ranks stop, save on SIGTERM, and take time-based decisions (``max_time``,
        ``ModelCheckpoint(train_time_interval=...)``) at the same step. fit calls it once per
        step. With :attr:`voting` it is one CPU all-reduce over the ``control`` gloo group (no
        wait on the GPU stream). Without a strategy but in a process group the user set up
        (a hand-written distributed step), the flags are OR-ed over that default group on
        ``device`` and each rank keeps its own clock. Otherwise nothing to agree on."""
        if self.voting:
            group, on = self.control, torch.device("cpu")
        elif not self.active and dist.is_available() and dist.is_initialized():
            group, on = None, device
        else:
            return flags, elapsed
        t = torch.tensor([*(float(f) for f in flags), elapsed], dtype=torch.float64, device=on)
        host_all_reduce(t, self.mesh, "agreeing on when to stop", op=dist.ReduceOp.MAX, group=group)
        *agreed, clock = t.tolist()
        return tuple(bool(v) for v in agreed), clock if self.voting else elapsed

    def mean(self, metrics: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Step metrics averaged over ranks (a collective: at log points only)."""
        if not self.mesh.distributed:
            return metrics
        return reduce_metrics(metrics, self.mesh)

    def sum(self, acc: Any) -> Any:
        """An accumulator (the means' ``[sum_1..sum_M, n]`` and the Sum states' totals, any
        pytree of tensors) summed over ranks: new tensors, one all-reduce per dtype."""
        return sum_over_ranks(acc, self.mesh)

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], run: Run, *, agreed: bool = True,
             metadata: Mapping[str, Any] | None = None) -> None:
        """Write ``run`` as a fit checkpoint (see :mod:`lightfn.fit._run`) with ``metadata``
        (default: :func:`~lightfn.fit._run.run_metadata` ``()``).

        ``agreed``: every rank calls this for the same path now (all saves fit makes from
        callback signals and on SIGTERM). A save from one rank alone (``on_exception``) is
        written by rank 0 with its own metric sums, or skipped for a sharded state.
        """
        mesh = self.mesh
        metadata = run_metadata() if metadata is None else metadata
        if not self.active:
            if self.is_main:
                save_run(path, run, metadata)
            return
        if agreed and mesh.distributed and run.acc is not None:
            run = run.replace(acc=self.sum(run.acc))  # a resumed run's epoch means then cover every rank
        if not self.fsdp:
            if mesh.is_main:
                save_run(path, run, metadata)
            return
        if not agreed:
            if mesh.is_main:
                _log.warning("not writing %s: a fully sharded checkpoint needs every rank, and this save is not", path)
            return
        save_sharded(path, to_tree(run), mesh, gather=self.strategy.gather_checkpoints, metadata=metadata)

    def restore(self, path: Path, like: Run) -> Run:
        """:func:`~lightfn.fit._run.load_run` for this strategy, from a sharded folder, a
        gathered file, or a replicated file."""
        mesh = self.mesh
        if self.fsdp and path.is_dir():
            index = read_index(path)
            if index["world_size"] == mesh.world_size:
                run = load_run(path / index["files"][mesh.rank], like)
            else:  # another number of ranks wrote it (e.g. an elastic restart on fewer nodes)
                run = load_run(path / index["files"][0], like, read=lambda template: load_sharded(path, template, mesh))
        elif self.fsdp:
            run = load_run(path, like.replace(state=full_template(like.state)))
            run = run.replace(state=cut_full(run.state, like.state, mesh))
        else:
            run = load_run(path, like)
        if run.acc is not None and self.active and mesh.rank != 0:
            # the saved sums cover every rank: counted once, on rank 0
            run = run.replace(acc=tree.map(torch.zeros_like, run.acc))
        return run

    def delete(self, path: str | os.PathLike[str]) -> None:
        """Remove a checkpoint fit no longer keeps (rank 0; a sharded folder with its files)."""
        if not self.is_main:
            return
        p = Path(path)
        if p.is_dir():
            if not (p / INDEX_NAME).is_file():
                raise FitError(f"refusing to delete {p}: a folder that is not a sharded checkpoint")
            for f in read_index(p)["files"]:
                (p / f).unlink(missing_ok=True)
            (p / INDEX_NAME).unlink()
            with contextlib.suppress(OSError):  # something else lives there too: keep it
                p.rmdir()
            return
        p.unlink(missing_ok=True)

    # -- the run -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """A dead or stalled rank becomes a clear DistributedError after the timeout; the
        control group is released when the block ends, however it ends."""
        try:
            with guard(self.mesh, "training"):
                yield
        finally:
            if self.control is not None:
                dist.destroy_process_group(self.control)
                # Let the group object go now: a gloo group joins its threads only when freed,
                # and this object may outlive fit in a traceback (SIGTERM preemption exits by
                # SystemExit) until interpreter teardown, where a joinable thread aborts the
                # process (see lightfn/distributed/_lifetime.py).
                object.__setattr__(self, "control", None)

    def finish(self, state: Any) -> Any:
        """The state fit returns: gathered again when fit sharded it (a collective)."""
        return unshard_state(state, self.mesh) if self.sharded_by_fit else state


def setup_processes(strategy: str | Strategy | None, step: Any, state: Any, eval_step: Any) -> Processes:
    """Join torchrun's process group and wrap ``step``/``state``/``eval_step`` for ``strategy``.

    ``None`` with a plain step gives an inactive :class:`Processes` (fit runs as one process).
    Raises :class:`~lightfn.errors.DistributedError` with the torchrun command to use when a
    strategy is asked for outside torchrun.
    """
    kind = classify(step)
    strategy = _resolve(strategy, kind)
    if strategy is None:
        return Processes(mesh=single_process_mesh("cpu"), strategy=None, step=step, state=state, eval_step=eval_step)
    require_launched(f"fit(strategy={strategy.name!r})")
    mesh = init(timeout=strategy.timeout)
    wrapped = kind.distributed is not None
    if eval_step is not None and isinstance(eval_step, EvalStep) and not isinstance(eval_step.loss_fn, RankFoldedLoss):
        eval_step = data_parallel(eval_step, mesh)
    sharded_by_fit = False
    if strategy.name == "ddp":
        step = step if wrapped else data_parallel(_train_step(step, kind, "ddp"), mesh)
        state = replicate_state(state, mesh)
    else:
        step = step if wrapped else fully_sharded(_train_step(step, kind, "fsdp"), mesh)
        if not (isinstance(state, TrainState) and isinstance(state.params, ShardedParams)):
            state, sharded_by_fit = shard_state(state, mesh), True
        if eval_step is not None:
            eval_step = fully_sharded_eval(eval_step, mesh)
    control = control_group(mesh)
    return Processes(mesh=mesh, strategy=strategy, step=step, state=state, eval_step=eval_step, sharded_by_fit=sharded_by_fit,
                  control=control)


def control_group(mesh: Mesh) -> Any:
    """A new gloo group over ``mesh``'s ranks for host-side votes (``None`` for one process).

    A collective call: every rank makes it at the same point. Also on gloo meshes, so the
    code NCCL runs depend on is the code CPU tests run.
    """
    if not mesh.distributed:
        return None
    with guard(mesh, "creating the control group"):
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=mesh.timeout))


def _train_step(step: Any, kind: StepKind, name: str) -> TrainStep:
    if kind.jitted:
        raise FitError(
            f"strategy={name!r} rewrites the lf.train_step, but this step is already compiled with lf.jit; pass the "
            "lf.train_step itself (fit compiles it, collectives included)"
        )
    if not isinstance(step, TrainStep):
        raise FitError(
            f"strategy={name!r} rewrites an lf.train_step, and this step is a {type(step).__name__}. For a hand-written "
            "step, call lf.distributed.all_reduce_mean(grads, mesh) inside it and train with your own loop, or build "
            "it with lf.train_step"
        )
    return step
