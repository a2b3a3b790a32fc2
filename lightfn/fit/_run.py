"""The :class:`Run`: everything one ``lf.fit`` run carries from step to step, which is
exactly what a fit checkpoint holds.

Saving a run is :func:`save_run` ``(path, run)``; resuming is :func:`load_run`
``(path, like=run)``, where ``like`` is the run fit is about to start (its state gives the
structure, dtypes and devices to load into). The file is one safetensors pytree (see
:mod:`lightfn.checkpoint`) laid out as

- the TrainState's fields at the top level (``step``, ``params``, ``opt_state``, ``rng``,
  ``buffers``, ``loss_scale``, ``extra``), so ``lf.load(path)["params"]`` is all inference
  needs and ``lf.load(path, like=train_state)`` returns the TrainState (a dict state's
  keys are at the top level the same way; any other state is under ``"state"``);
- ``"loop"``: the :class:`Position` (``epoch``, ``batch`` within it, host ``step``,
  ``last_val_step``, ``stop_requested``, ``elapsed`` seconds), the data order seed
  (``data_seed``, as a string; empty when the data has none), the epoch's metric sums
  (``acc``, see :mod:`lightfn.fit._accumulate`) and their names (``metrics``, JSON), the
  epoch's totals of ``lf.metrics.Sum`` states (``sums``: ``{name: total}``, present only
  when the step returns such states), the latest logged host values (``logged``, JSON:
  what callbacks see as ``ctx.metrics``, so a checkpoint name or an epoch-end check right
  after a resume sees the same values), and, once a background compile switched a graph,
  the steps at which each switched (``compiled``, JSON: ``{"train": step, "eval": step}``);
- ``"callbacks"``: each callback's non-empty ``state_dict()`` under its ``state_key``: a
  JSON string, or, when the state holds tensors, ``{"json": <the other values as JSON>,
  "tensors": {<name>: tensor or dict of tensors}}`` (tensors stored as tensors, bit-exact);
- metadata (:func:`run_metadata`): ``{"written_by": "lightfn.fit"}`` plus ``"hparams"``
  when fit was given ``hparams=``, read back with ``lf.read_metadata(path)["hparams"]``.

Because the data order is a pure function of (seed, epoch) and every random number a step
draws comes from the state, restoring all of this continues a run at the exact batch: the
resumed run ends with the same bits as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import tree
from ..checkpoint._format import FIT_RUN_KEYS, FIT_WRITER, FIT_WRITER_KEY, HPARAMS_KEY
from ..callbacks._common import decode_float, encode_float
from ..checkpoint import load, save
from ..errors import FitError
from ..state import TrainState
from ._accumulate import Acc

__all__ = ["Position", "Run", "to_tree", "save_run", "load_run", "run_metadata", "data_seed"]


@dataclasses.dataclass(kw_only=True)
class Position:
    """Where the loop is. ``batch``: batches done in ``epoch``; ``step``: steps taken in
    the run; ``epoch_done``: ``epoch``'s end was processed (a checkpoint then resumes at the
    next epoch; it stays False when a stop closed the epoch before its last batch, so a
    resumed run continues inside it); ``last_val_step``: the step of the latest validation
    (so a resumed run neither repeats nor skips one); ``elapsed``: seconds of training
    before this process (earlier runs resumed from)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    epoch_done: bool = False
    last_val_step: int = -1
    stop_requested: bool = False
    elapsed: float = 0.0


@dataclasses.dataclass(kw_only=True)
class Run:
    """One fit run's state: the train state and the loop's bookkeeping around it.

    ``acc``: the epoch's metric accumulator ``{"mean": [sum_1..sum_M, n], "sum": {name:
    total}}`` (``None`` before the first step); ``metric_names``: its slots' names
    (``None`` until known); ``logged``: the latest logged host values; ``data_seed``: the
    train data's order seed (``""`` without one); ``callbacks``: each stateful callback's
    ``state_dict()`` by ``state_key`` (filled when the run is saved or loaded);
    ``compiled``: the step at which each graph fit compiles in the background switched from
    eager to compiled (``{"train": step, "eval": step}``, :mod:`lightfn.fit._background`),
    so a resumed run makes the same choice.
    """

    state: Any
    position: Position = dataclasses.field(default_factory=Position)
    acc: Acc | None = None
    metric_names: tuple[str, ...] | None = None
    logged: dict[str, float] = dataclasses.field(default_factory=dict)
    data_seed: str = ""
    callbacks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    compiled: dict[str, int] = dataclasses.field(default_factory=dict)

    def replace(self, **changes: Any) -> Run:
        return dataclasses.replace(self, **changes)


def data_seed(data: Any) -> str:
    """The data order seed of an ``lf.data.ArrayLoader`` (as a string), else ``""``."""
    from ..data import ArrayLoader

    return str(data.seed) if isinstance(data, ArrayLoader) else ""


# ----------------------------------------------------------------------------- the layout


def _state_fields(state: Any) -> dict[str, Any]:
    if isinstance(state, TrainState):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}
    if isinstance(state, dict) and all(isinstance(k, str) for k in state):
        clash = [k for k in FIT_RUN_KEYS if k in state]
        if clash:
            raise FitError(f"the state dict has a key {clash[0]!r}, which fit checkpoints reserve; rename it")
        return dict(state)
    return {"state": state}


def _state_from(like: Any, saved: Mapping[str, Any]) -> Any:
    if isinstance(like, TrainState):
        return like.replace(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState)})
    if isinstance(like, dict) and all(isinstance(k, str) for k in like):
        return {k: saved[k] for k in like}
    return saved["state"]


def to_tree(run: Run) -> dict[str, Any]:
    """The checkpoint pytree of ``run`` (layout in the module docstring).

    At an epoch's end (``position.epoch_done``) the position stored is the start of the
    next epoch, with zeroed sums, so a resumed run does not process that epoch's end twice.
    """
    pos, acc = run.position, run.acc
    epoch, batch = (pos.epoch + 1, 0) if pos.epoch_done else (pos.epoch, pos.batch)
    if acc is not None and pos.epoch_done:
        acc = tree.map(torch.zeros_like, acc)
    loop = {
        "epoch": epoch,
        "batch": batch,
        "step": pos.step,
        "last_val_step": pos.last_val_step,
        "stop_requested": pos.stop_requested,
        "elapsed": float(pos.elapsed),
        "data_seed": run.data_seed,
        "metrics": json.dumps(list(run.metric_names or ())),
        "logged": json.dumps({k: encode_float(float(v)) for k, v in run.logged.items()}),
        "acc": None if acc is None else acc["mean"],
    }
    if acc is not None and acc["sum"]:  # absent otherwise: the layout checkpoints had before Sum states
        loop["sums"] = acc["sum"]
    if run.compiled:  # absent otherwise: the layout checkpoints had before background compiles
        loop["compiled"] = json.dumps(run.compiled, sort_keys=True)
    # Only callbacks with bookkeeping are stored (a progress bar has none to carry over).
    stored = {k: _encode(k, v) for k, v in run.callbacks.items() if v}
    return {**_state_fields(run.state), "loop": loop, "callbacks": stored}


def _template(like: Run, loop: Mapping[str, Any], saved_callbacks: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`load` fills: ``like``'s state, an accumulator shaped as the file's
    (``loop``: the file's loop entry), and the callback entries the file holds (their
    tensors' shapes come from the file)."""
    device = tree.device_of(like.state)
    acc = _acc_of(loop)
    shaped = None if acc is None else tree.map(lambda x: torch.zeros_like(x, device=device), acc)
    template = to_tree(Run(state=like.state, acc=shaped))
    template["loop"] = {**template["loop"], "data_seed": "", "metrics": "", "logged": ""}
    if "compiled" in loop:
        template["loop"]["compiled"] = ""
    template["callbacks"] = tree.map(
        lambda x: torch.empty_like(x, device=device) if isinstance(x, torch.Tensor) else "", saved_callbacks)
    return template


def _is_tensors(x: Any) -> bool:
    """A tensor, or a non-empty dict with string keys of such (what a callback state may hold)."""
    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, dict) and bool(x) and all(isinstance(k, str) and _is_tensors(v) for k, v in x.items())


def _encode(key: str, state: Mapping[str, Any]) -> Any:
    """A callback state as stored: JSON, with its tensor values (if any) beside it."""
    tensors = {k: v for k, v in state.items() if _is_tensors(v)}
    try:
        text = json.dumps({k: v for k, v in state.items() if k not in tensors})
    except (TypeError, ValueError) as e:
        raise FitError(
            f"the state_dict() of callback {key!r} cannot be saved: {e}. Its values must be JSON-serializable, "
            "or tensors (a tensor or a dict of tensors at the top level)"
        ) from None
    if not tensors:
        return text
    return {"json": text, "tensors": tree.map(lambda t: t.detach(), tensors)}


def _decode(stored: Any) -> dict[str, Any]:
    if isinstance(stored, str):
        return json.loads(stored)
    return {**json.loads(stored["json"]), **stored["tensors"]}


# ----------------------------------------------------------------------------- files


def run_metadata(hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of every checkpoint fit writes: the fit mark, and ``hparams`` if given.

    ``hparams`` is checked here, once, so a value JSON cannot hold fails when fit starts,
    not at the first checkpoint an hour later.
    """
    meta: dict[str, Any] = {FIT_WRITER_KEY: FIT_WRITER}
    if hparams is None:
        return meta
    if not isinstance(hparams, Mapping):
        raise FitError(f"hparams must be a dict of hyperparameters, got {type(hparams).__name__}")
    try:
        # a JSON round trip: what read_metadata returns later (tuples become lists...)
        meta[HPARAMS_KEY] = json.loads(json.dumps(dict(hparams)))
    except (TypeError, ValueError) as e:
        raise FitError(
            f"hparams must be JSON-serializable (numbers, strings, bools, None, lists and dicts of them): {e}. "
            "Convert such a value (e.g. str(path), a list for a tensor) or leave it out"
        ) from None
    return meta


def save_run(path: str | os.PathLike[str], run: Run, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``run`` atomically, with ``metadata`` (default: :func:`run_metadata` ``()``)."""
    return save(path, to_tree(run), metadata=run_metadata() if metadata is None else metadata)


def _acc_of(loop: Mapping[str, Any]) -> Acc | None:
    """The accumulator a checkpoint's ``"loop"`` holds (``None`` before the first step)."""
    return None if loop["acc"] is None else {"mean": loop["acc"], "sum": loop.get("sums", {})}


def load_run(path: str | os.PathLike[str], like: Run, *, read: Callable[[Any], Any] | None = None) -> Run:
    """The run saved at ``path``, loaded into the structure of ``like``.

    ``like.state`` is the template: the result has its structure, dtypes and devices, and
    any mismatch is refused naming each differing path. ``like.data_seed`` must be the seed
    the run was written with (another order would not resume exactly). ``read(template)``
    loads the whole checkpoint into the template (default: ``lf.load(path, like=template)``);
    a sharded checkpoint written by another number of ranks passes one that reshards while
    loading. The result's ``callbacks`` holds the decoded callback states.
    """
    path = Path(path)
    if not path.is_file():
        raise FitError(f"resume_from={str(path)!r}: no such checkpoint file")
    template = _template(like, load(path, subtree="loop"), load(path, subtree="callbacks"))
    ckpt = load(path, like=template) if read is None else read(template)
    loop = ckpt["loop"]
    if loop["data_seed"] != like.data_seed:
        raise FitError(
            f"{path} was written by a run whose training data order seed is {loop['data_seed'] or 'none'!s}, but "
            f"this train_data's is {like.data_seed or 'none'!s}; build the ArrayLoader with "
            f"seed={loop['data_seed']} to resume exactly"
        )
    position = Position(epoch=loop["epoch"], batch=loop["batch"], step=loop["step"],
                        last_val_step=loop["last_val_step"], stop_requested=loop["stop_requested"],
                        elapsed=loop["elapsed"])
    return Run(
        state=_state_from(like.state, ckpt),
        position=position,
        acc=_acc_of(loop),
        metric_names=tuple(json.loads(loop["metrics"])),
        logged={k: decode_float(v) for k, v in json.loads(loop["logged"]).items()},
        data_seed=loop["data_seed"],
        callbacks={k: _decode(v) for k, v in ckpt["callbacks"].items()},
        compiled={str(k): int(v) for k, v in json.loads(loop.get("compiled") or "{}").items()},
    )
