"""functionalize: an ``nn.Module`` as a pure ``apply(params, *args)`` plus its params.

``params`` is a flat dict ``{name: tensor}`` keyed like ``module.named_parameters()``
(dotted names, e.g. ``"0.weight"``), detached copies that belong to the caller. Nest such
dicts yourself to combine sub-models: ``{"encoder": enc_params, "decoder": dec_params}``.
Tied weights appear once, under their first name, and stay tied inside ``apply``.

Buffers (BatchNorm running statistics) are state a pure function may not mutate
behind the caller's back. With ``with_state=True`` they are explicit::

    apply, params, buffers = lf.functionalize(model, with_state=True)
    y, new_buffers = apply(params, buffers, x)             # training mode: stats update
    y, _ = apply(params, buffers, x, train=False)          # eval mode: stats are read

Train/eval mode is an explicit keyword of ``apply`` (``train=``), defaulting to the
module's mode when it was functionalized; the caller's module is never switched. A module
whose ``forward`` has its own ``train`` parameter is refused (a ``train=`` keyword could
never reach it); ``mode_keyword=`` gives the switch another name.

Fine-tuning with a frozen backbone usually wants the backbone's BatchNorm (and Dropout)
in eval mode while the head trains: ``eval_modules=`` names submodules that stay in eval
mode even under ``train=True``, so their running statistics are read, never updated::

    apply, params, buffers = lf.functionalize(model, with_state=True, eval_modules=["backbone"])
    frozen_backbone = lambda path, leaf: not path[0].startswith("backbone.")
    step = lf.train_step(loss_fn, opt, with_state=True, trainable=frozen_backbone)

(If every BatchNorm is in an eval module, ``with_state`` is not needed.)
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from ._eager import plain_eager
from .errors import StepError

__all__ = ["functionalize"]


def _skeleton(module: nn.Module, train: bool, eval_modules: tuple[str, ...]) -> nn.Module:
    # A tensor-free copy of the module in the requested mode: functional_call swaps every
    # parameter and buffer in, so the copy needs structure, not memory. Meta stand-ins go
    # through deepcopy's memo so tied weights stay one object (module.to("meta") unties).
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    skel = copy.deepcopy(module, memo).train(train)
    for name in eval_modules:
        skel.get_submodule(name).eval()
    return skel


def _swapper(skeleton: nn.Module) -> Callable[[dict[str, torch.Tensor], tuple[Any, ...], dict[str, Any]], Any]:
    """``call(values, args, kwargs)``: ``skeleton(*args, **kwargs)`` with ``values`` swapped in.

    What ``functional_call(skeleton, values, args, kwargs, tie_weights=True)`` does, for a
    caller that passes every tensor under its first name, with the slots looked up once
    here: plain eager, functional_call's per-call bookkeeping (re-walking the module tree,
    untying, a swap object per tensor) costs about 0.1 ms, a tenth of a small model's
    step. Each slot is a ``_parameters`` or ``_buffers`` entry, exactly what
    functional_call swaps; a tied slot takes its first name's tensor. The meta tensors go
    back afterwards, so the skeleton never holds on to the caller's tensors.
    """
    first: dict[int, str] = {}
    slots: list[tuple[dict[str, Any], str, str, Any]] = []
    for named, store_of in (
        (skeleton.named_parameters(remove_duplicate=False), lambda m: m._parameters),
        (skeleton.named_buffers(remove_duplicate=False), lambda m: m._buffers),
    ):
        for name, t in named:
            owner, _, attr = name.rpartition(".")
            slots.append((store_of(skeleton.get_submodule(owner)), attr, first.setdefault(id(t), name), t))

    def call(values: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            for store, attr, name, _ in slots:
                store[attr] = values[name]
            return skeleton(*args, **kwargs)
        finally:
            for store, attr, _, meta in slots:
                store[attr] = meta

    return call


def _check_eval_modules(module: nn.Module, eval_modules: Iterable[str]) -> tuple[str, ...]:
    if isinstance(eval_modules, str):
        raise StepError(f"lf.functionalize: eval_modules must be a list of submodule names, got the string {eval_modules!r}")
    names = tuple(eval_modules)
    known = dict(module.named_modules())
    unknown = [n for n in names if n not in known]
    if unknown:
        tops = sorted(n for n in known if n and "." not in n)
        raise StepError(
            f"lf.functionalize: eval_modules {unknown} are not submodules of {type(module).__name__}; names are "
            f"dotted as in named_modules() (its top-level ones: {tops})"
        )
    return names


def _updates_running_stats(module: nn.Module) -> bool:
    """Whether a forward in ``module``'s current modes would update BatchNorm statistics."""
    return any(
        isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training for m in module.modules()
    )


def _check_keys(p: Any, expected: frozenset[str], what: str) -> None:
    if not isinstance(p, dict):
        raise StepError(f"{what} must be a dict of tensors keyed like named_parameters(), got {type(p).__name__}")
    if p.keys() != expected:
        missing, extra = sorted(expected - p.keys()), sorted(p.keys() - expected)
        raise StepError(
            f"{what} do not match the module: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra}" if extra else "")
        )


def _check_mode_keyword(module: nn.Module, mode_keyword: str) -> None:
    if not (isinstance(mode_keyword, str) and mode_keyword.isidentifier()):
        raise StepError(f"lf.functionalize: mode_keyword must be a keyword name, got {mode_keyword!r}")
    try:
        names = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # no Python signature to read
        return
    if mode_keyword in names:
        other = "training_mode" if mode_keyword != "training_mode" else "lf_train"
        raise StepError(
            f"{type(module).__name__}.forward has its own {mode_keyword!r} parameter, but apply(params, ..., "
            f"{mode_keyword}=...) is lightfn's train/eval switch, so a {mode_keyword}= keyword would never reach "
            f"forward and results would change silently. Rename forward's parameter, or give the switch another "
            f"name: lf.functionalize(module, mode_keyword={other!r}) makes apply(..., {other}=False) the switch "
            f"and passes {mode_keyword}= through to forward."
        )


def functionalize(
    module: nn.Module, *, with_state: bool = False, mode_keyword: str = "train", eval_modules: Iterable[str] = ()
) -> tuple[Callable[..., Any], dict[str, torch.Tensor]] | tuple[Callable[..., Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Turn ``module`` into ``(apply, params)`` (or ``(apply, params, buffers)``).

    Args:
        module: any ``nn.Module``; it is not modified.
        with_state: expose buffers as explicit state: ``apply(params, buffers, *args,
            train=..., **kwargs) -> (output, new_buffers)``. Without it, buffers are
            baked in as constants, and a module whose buffers would be updated in training
            (BatchNorm) is refused rather than silently mutated.
        mode_keyword: the name of ``apply``'s train/eval keyword (default ``train``). A
            module whose ``forward`` takes a parameter of that name is refused; pick
            another name to keep forward's own. (A ``forward(**kwargs)`` cannot be checked:
            ``apply`` takes ``train=`` for itself there.)
        eval_modules: names of submodules (dotted, as in ``named_modules()``) that run in
            eval mode even when ``apply`` runs in training mode: a frozen backbone's
            BatchNorm reads its running statistics instead of updating them, its Dropout
            is off.

    Returns:
        ``apply(params, *args, train=<module.training>, **kwargs)`` and ``params``, a dict
        of detached tensors (plus ``buffers`` with ``with_state=True``).
    """
    if not isinstance(module, nn.Module):
        raise StepError(f"lf.functionalize expects an nn.Module, got {type(module).__name__}")
    _check_mode_keyword(module, mode_keyword)
    eval_names = _check_eval_modules(module, eval_modules)
    default_train = module.training
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    skeletons = {mode: _skeleton(module, mode, eval_names) for mode in (True, False)}
    swappers = {mode: _swapper(skel) for mode, skel in skeletons.items()}

    def run(train: bool, values: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Traced, transformed or captured calls keep torch's functional_call, which every
        # tracer knows; plain eager calls take the same swap without its bookkeeping.
        if plain_eager():
            return swappers[train](values, args, kwargs)
        return functional_call(skeletons[train], values, args, kwargs, tie_weights=True)

    param_keys, buffer_keys = frozenset(params), frozenset(buffers)

    if with_state:

        def apply_with_state(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
            # Clones receive BatchNorm's in-place updates, so the caller's buffers stay as
            # they were and the updated ones come back as a new dict.
            train = kwargs.pop(mode_keyword, default_train)
            _check_keys(p, param_keys, "params")
            _check_keys(b, buffer_keys, "buffers")
            new_b = {k: v.clone() for k, v in b.items()} if train else dict(b)
            out = run(bool(train), {**p, **new_b}, args, kwargs)
            return out, new_b

        apply_with_state.__doc__ = f"Pure apply of {type(module).__name__}: (params, buffers, *args, {mode_keyword}=...) -> (out, buffers)."
        return apply_with_state, params, buffers

    updates_buffers_in_training = _updates_running_stats(skeletons[True])
    if default_train and updates_buffers_in_training:
        raise StepError(
            f"{type(module).__name__} has BatchNorm running statistics that training would update in place; "
            "use lf.functionalize(module, with_state=True) to carry them as explicit state, "
            "or functionalize a module in eval mode (module.eval()) to use them as constants"
        )
    frozen = dict(buffers)

    def apply(p: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        train = kwargs.pop(mode_keyword, default_train)
        if train and updates_buffers_in_training:
            raise StepError("apply(..., train=True) would update BatchNorm buffers; functionalize with with_state=True")
        _check_keys(p, param_keys, "params")
        return run(bool(train), {**p, **frozen}, args, kwargs)

    apply.__doc__ = f"Pure apply of {type(module).__name__}: (params, *args, {mode_keyword}=...) -> output."
    return apply, params
