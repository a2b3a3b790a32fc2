"""What a checkpoint written by ``lf.fit`` holds, and how a run is restored from it.

A fit checkpoint is one safetensors pytree (see :mod:`lightfn.checkpoint`) with

- the TrainState's fields at the top level (``step``, ``params``, ``opt_state``, ``rng``,
  ``buffers``, ``loss_scale``, ``extra``), so ``lf.load(path)["params"]`` is all inference
  needs (a dict state's keys are at the top level the same way; any other state is under
  ``"state"``);
- ``"loop"``: the loop position (``epoch``, ``batch`` within it, host ``step``,
  ``last_val_step``, ``stop_requested``, ``elapsed`` seconds), the data order seed
  (``data_seed``, as a string; empty when the data has none), the epoch's metric sums
  (``acc``, see :mod:`lightfn.runner`) and their names (``metrics``, JSON), the epoch's
  totals of ``lf.metrics.Sum`` states (``sums``: ``{name: total}``, present only when the
  step returns such states), and the latest
  logged host values (``logged``, JSON: what callbacks see as ``ctx.metrics``, so e.g. a
  checkpoint name or an epoch-end check right after a resume sees the same values);
- ``"callbacks"``: each callback's non-empty ``state_dict()`` under its ``state_key``: a
  JSON string, or, when the state holds tensors, ``{"json": <the other values as JSON>,
  "tensors": {<name>: tensor or dict of tensors}}`` (tensors stored as tensors, bit-exact);
- metadata (:func:`run_metadata`): ``{"written_by": "lightfn.fit"}`` plus ``"hparams"``
  when fit was given ``hparams=``, read back with ``lf.read_metadata(path)["hparams"]``.

``lf.load(path, like=train_state)`` skips ``"loop"`` and ``"callbacks"`` (the template has
neither), so a fit checkpoint loads directly as the TrainState it holds.

Because the data order is a pure function of (seed, epoch) and every random number a step
draws comes from the state, restoring all of this continues a run at the exact batch: the
resumed run ends with the same bits as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import tree
from ._ckpt_format import FIT_RUN_KEYS, FIT_WRITER, FIT_WRITER_KEY, HPARAMS_KEY
from .callbacks.base import Callback
from .callbacks._common import decode_float, encode_float
from .checkpoint import load, save
from .loop import FitError, Position
from .state import TrainState

__all__ = ["pack", "save_run", "restore_run", "run_metadata", "data_seed"]

_log = logging.getLogger("lightfn.fit")
_RESERVED = FIT_RUN_KEYS


def data_seed(data: Any) -> str:
    """The data order seed of an ``lf.data.ArrayLoader`` (as a string), else ``""``."""
    from .data import ArrayLoader

    return str(data.seed) if isinstance(data, ArrayLoader) else ""


def _state_fields(state: Any) -> dict[str, Any]:
    if isinstance(state, TrainState):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}
    if isinstance(state, dict) and all(isinstance(k, str) for k in state):
        clash = [k for k in _RESERVED if k in state]
        if clash:
            raise FitError(f"the state dict has a key {clash[0]!r}, which fit checkpoints reserve; rename it")
        return dict(state)
    return {"state": state}


def _unpack_state(like: Any, saved: Mapping[str, Any]) -> Any:
    if isinstance(like, TrainState):
        return like.replace(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState)})
    if isinstance(like, dict) and all(isinstance(k, str) for k in like):
        return {k: saved[k] for k in like}
    return saved["state"]


def pack(
    state: Any,
    pos: Position,
    acc: dict[str, Any] | torch.Tensor | None,
    names: Sequence[str] | None,
    callbacks: Sequence[Callback],
    seed: str,
    elapsed: float,
    logged: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The whole loop as one pytree (layout in the module docstring).

    ``acc``: the runner's accumulator ``{"mean": sums, "sum": {name: total}}`` (or the
    means' vector alone), ``None`` before the first step.

    At an epoch's end (``pos.epoch_done``) the position is the start of the next epoch, so
    a resumed run does not process that epoch's end twice.
    """
    if isinstance(acc, torch.Tensor):  # the means' vector alone: no Sum states
        acc = {"mean": acc, "sum": {}}
    epoch, batch = (pos.epoch + 1, 0) if pos.epoch_done else (pos.epoch, pos.batch)
    if acc is not None and pos.epoch_done:
        acc = tree.map(torch.zeros_like, acc)
    loop = {
        "epoch": epoch,
        "batch": batch,
        "step": pos.step,
        "last_val_step": pos.last_val_step,
        "stop_requested": pos.stop_requested,
        "elapsed": float(pos.elapsed + elapsed),
        "data_seed": seed,
        "metrics": json.dumps(list(names or ())),
        "logged": json.dumps({k: encode_float(float(v)) for k, v in (logged or {}).items()}),
        "acc": None if acc is None else acc["mean"],
    }
    if acc is not None and acc["sum"]:  # absent otherwise: the layout checkpoints had before Sum states
        loop["sums"] = acc["sum"]
    # Only callbacks with bookkeeping are stored (a progress bar has none to carry over).
    states = {cb.state_key: cb.state_dict() for cb in callbacks}
    return {**_state_fields(state), "loop": loop, "callbacks": {k: _encode(k, v) for k, v in states.items() if v}}


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


def save_run(path: str | os.PathLike[str], tree: dict[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a packed loop atomically, with ``metadata`` (default: :func:`run_metadata` ``()``)."""
    return save(path, tree, metadata=run_metadata() if metadata is None else metadata)


def restore_run(
    path: str | os.PathLike[str],
    state: Any,
    callbacks: Sequence[Callback],
    seed: str,
    *,
    read: Callable[[Any], Any] | None = None,
) -> tuple[Any, Position, dict[str, Any] | None, tuple[str, ...], dict[str, float]]:
    """``(state, position, acc, metric_names, logged)`` from a fit checkpoint; loads callback states.

    ``acc`` is the runner's accumulator ``{"mean": sums, "sum": {name: total}}`` (``None``
    when the checkpoint was written before the first step).

    ``state`` is the template: the result has its structure, dtypes and devices, and any
    mismatch is refused naming each differing path. ``read(template)`` loads the whole
    checkpoint into the template (default: ``lf.load(path, like=template)``); a sharded
    checkpoint written by another number of ranks passes one that reshards while loading.
    """
    path = Path(path)
    if not path.is_file():
        raise FitError(f"resume_from={str(path)!r}: no such checkpoint file")
    loop = load(path, subtree="loop")
    saved_cbs = load(path, subtree="callbacks")
    acc = None if loop["acc"] is None else {"mean": loop["acc"], "sum": loop.get("sums", {})}
    device = tree.device_of(state)
    like = None if acc is None else tree.map(lambda x: torch.zeros_like(x, device=device), acc)
    template = pack(state, Position(), like, None, [], "", 0.0)
    template["loop"] = {**template["loop"], "data_seed": "", "metrics": "", "logged": ""}
    # A callback's tensors load onto the state's device; their shapes come from the file.
    template["callbacks"] = tree.map(
        lambda x: torch.empty_like(x, device=device) if isinstance(x, torch.Tensor) else "", saved_cbs)
    ckpt = load(path, like=template) if read is None else read(template)
    loop = ckpt["loop"]
    if loop["data_seed"] != seed:
        raise FitError(
            f"{path} was written by a run whose training data order seed is {loop['data_seed'] or 'none'!s}, but "
            f"this train_data's is {seed or 'none'!s}; build the ArrayLoader with seed={loop['data_seed']} to "
            "resume exactly"
        )
    for cb in callbacks:
        if cb.state_key in ckpt["callbacks"]:
            cb.load_state_dict(_decode(ckpt["callbacks"][cb.state_key]))
    unused = set(ckpt["callbacks"]) - {cb.state_key for cb in callbacks}
    if unused:
        _log.warning("resume: %s holds state of callbacks not passed to this fit: %s", path, sorted(unused))
    pos = Position(
        epoch=loop["epoch"],
        batch=loop["batch"],
        step=loop["step"],
        last_val_step=loop["last_val_step"],
        stop_requested=loop["stop_requested"],
        elapsed=loop["elapsed"],
    )
    logged = {k: decode_float(v) for k, v in json.loads(loop["logged"]).items()}
    acc = None if loop["acc"] is None else {"mean": loop["acc"], "sum": loop.get("sums", {})}
    return _unpack_state(state, ckpt), pos, acc, tuple(json.loads(loop["metrics"])), logged
