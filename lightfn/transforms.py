"""grad / value_and_grad / vmap / jit with JAX names and semantics, on torch.func.

``grad`` and ``value_and_grad`` differentiate a function with respect to a pytree of
tensors (``argnums`` picks which argument), with ``has_aux`` for returning metrics beside
the loss. ``jit`` is ``torch.compile`` with lightfn's defaults: the whole function in one
graph (``fullgraph=True``), the batch dimension dynamic so a short last batch does not
recompile, optional donation of the state, and a short error instead of a dynamo trace.

>>> import torch, lightfn as lf
>>> loss = lambda p, x: ((x @ p["w"]) ** 2).sum()
>>> g = lf.grad(loss)({"w": torch.ones(2)}, torch.eye(2))
>>> g["w"].tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.func

from . import tree
from ._compile import aot as _aot
from ._diagnostics import first_line, fn_name, user_frame
from ._compile.isa import isa_options, remember_isa_probe
from ._quiet import compile_messages_quieted
from .errors import CompileError, LightfnError, StepError

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


# ----------------------------------------------------------------------------------- jit


def jit_disabled() -> bool:
    """True when ``LIGHTFN_DISABLE_JIT=1`` is set: every ``lf.jit`` then runs eagerly."""
    return os.environ.get("LIGHTFN_DISABLE_JIT", "").strip().lower() in ("1", "true", "yes")


class Jitted:
    """A function compiled by :func:`jit` (callable like the original).

    ``fn`` is the original function, ``donate`` whether argument 0 is donated,
    ``compiled`` whether calls go through ``torch.compile`` (False when disabled).
    ``cache`` whether compiled steps come from the ahead-of-time artifact cache
    (:mod:`lightfn._compile.aot`); it is switched off, with one line saying why, for a function the
    cache cannot capture, which then compiles with ``torch.compile``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        donate: bool,
        dynamic_batch: bool,
        batch_argnums: tuple[int, ...] | None,
        compiled: bool,
        compile_kwargs: dict[str, Any],
        cache: bool = False,
    ) -> None:
        self.fn = fn
        self.donate = donate
        self.dynamic_batch = dynamic_batch
        self.batch_argnums = batch_argnums
        self.compiled = compiled
        self.cache = compiled and cache
        self._target = _donating(fn) if donate else fn
        self._compile_kwargs = compile_kwargs
        # With the cache, torch.compile (and importing dynamo, ~1 s) waits for a fallback.
        self._compiled: Callable[..., Any] | None = None
        if not compiled:
            self._compiled = self._target
        elif not self.cache:
            self._compiled = torch.compile(self._target, **compile_kwargs)
        self._cached: dict[Any, Any] = {}  # call signature -> lightfn._compile.aot.CachedStep
        self._isa_recorded = not compiled  # after the first compiled call: lightfn/_compile/isa.py
        functools.update_wrapper(self, fn)

    def _batch_argnums(self, args: tuple[Any, ...]) -> tuple[int, ...]:
        if not self.dynamic_batch:
            return ()
        return self.batch_argnums if self.batch_argnums is not None else (len(args) - 1,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.compiled:
            return self._target(*args, **kwargs)
        if self.cache:
            step, inputs = self._cached_step(args, kwargs)
            if step is not None:
                return step.call_flat(inputs.tensors, inputs.arg_defs)
        if self._compiled is None:
            self._compiled = torch.compile(self._target, **self._compile_kwargs)
        if self.dynamic_batch:
            nums = self._batch_argnums(args)
            for i in nums:
                if 0 <= i < len(args):
                    for x in tree.leaves(args[i]):
                        if isinstance(x, torch.Tensor) and x.dim() > 0:
                            torch._dynamo.maybe_mark_dynamic(x, 0)
        try:
            with compile_messages_quieted():
                out = self._compiled(*args, **kwargs)
        except LightfnError:
            raise
        except Exception as e:  # noqa: BLE001 - turned into an actionable message below
            if not _is_compile_failure(e):
                raise
            raise _explain_failure(self.fn, e, args, kwargs) from e
        if not self._isa_recorded:
            self._isa_recorded = True
            remember_isa_probe()
        return out

    def _cached_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """``(CachedStep, inputs)`` for this call, or ``(None, None)`` after a fallback."""
        nums = self._batch_argnums(args)
        try:
            inputs = _aot.Inputs(args, kwargs, nums, static=False)
            sig = inputs.signature()
            step = self._cached.get(sig)
            if step is not None and step.static and any(inputs.dynamic):  # built for one batch size only
                inputs = _aot.Inputs(args, kwargs, nums, static=True)
                sig = ("exact", inputs.signature())
                step = self._cached.get(sig)
            if step is None:
                options = dict(self._compile_kwargs.get("options", {}))
                step = _aot.compile_cached(self._target, args, kwargs, dynamic_argnums=nums, options=options)
                self._cached[sig] = step
                if step.static and any(inputs.dynamic):
                    self._cached[("exact", _aot.Inputs(args, kwargs, nums, static=True).signature())] = step
                if not self._isa_recorded:
                    self._isa_recorded = True
                    remember_isa_probe()
        except _aot.Unsupported as e:
            self.cache = False
            _aot.count("fallbacks")
            warnings.warn(
                f"lf.jit: {getattr(self.fn, '__qualname__', type(self.fn).__name__)} is not in the AOT cache "
                f"({e}); compiling with torch.compile instead",
                stacklevel=3,
            )
            return None, None
        return step, inputs


def _donating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn(state, ...) -> (new_state, *rest)`` so new_state is written into state."""

    @functools.wraps(fn)
    def donated(state: Any, *args: Any, **kwargs: Any) -> Any:
        out = fn(state, *args, **kwargs)
        if not isinstance(out, tuple) or len(out) < 1:
            raise StepError("with donate=True the function must return (new_state, ...) where new_state mirrors argument 0")
        new_state = out[0]
        old_leaves, old_def = tree.flatten(state)
        new_leaves, treedef = tree.flatten(new_state)
        if old_def != treedef:
            tree.assert_same_structure(state, new_state, what="the state returned by a donated function")
        result = []
        for i, (old, new) in enumerate(zip(old_leaves, new_leaves)):
            if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and new is not old:
                if old.shape != new.shape or old.dtype != new.dtype:
                    # Paths are looked up only here: optree's path API does not trace.
                    path = tree.keystr(tree.leaves_with_path(state)[i][0])
                    raise StepError(
                        f"donate=True: state{path} changed from {tuple(old.shape)} "
                        f"{old.dtype} to {tuple(new.shape)} {new.dtype}; donated state must keep shapes and dtypes"
                    )
                old.copy_(new)
                result.append(old)
            else:
                result.append(new)
        return (tree.unflatten(treedef, result), *out[1:])

    return donated


def _is_compile_failure(e: Exception) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch.fx", "torch._subclasses")) or "BackendCompilerFailed" in type(e).__name__


def _explain_failure(fn: Callable[..., Any], e: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
    # The function may simply be wrong (bad loss, wrong structure): an eager run of the
    # undonated function then raises the user-level error, which is the one to show.
    try:
        with torch.no_grad():
            fn(*args, **kwargs)
    except LightfnError as user_error:
        return user_error
    except Exception as eager_error:  # noqa: BLE001
        return StepError(f"{fn_name(fn)} fails even without compilation: {type(eager_error).__name__}: {eager_error}")
    where = user_frame(e)
    return CompileError(
        f"lf.jit could not compile {fn_name(fn)} into one graph: {first_line(e)}"
        + (f"\n {where}" if where else "")
        + "\n  Fix: keep the function pure tensor code (no .item(), print, Python branching on tensor values,"
        " or data-dependent shapes); use torch.where instead of `if` on tensors."
        "\n  To run eagerly instead: lf.jit(..., disable=True), fit(..., jit=False), or LIGHTFN_DISABLE_JIT=1."
    )


def jit(
    fn: Callable[..., Any] | None = None,
    *,
    donate: bool = False,
    dynamic_batch: bool = True,
    batch_argnums: Sequence[int] | None = None,
    mode: str | None = None,
    fullgraph: bool = True,
    disable: bool | None = None,
    backend: str = "inductor",
    options: dict[str, Any] | None = None,
    guard_globals: bool = False,
    cache: bool | None = None,
) -> Any:
    """Compile ``fn`` whole with ``torch.compile`` and lightfn's defaults.

    Args:
        donate: write the first output (a new state mirroring argument 0) into argument
            0's tensors with ``copy_`` inside the graph, so a train step allocates no new
            params or optimizer moments. The caller must not keep using the old state.
        dynamic_batch: mark dim 0 of the batch argument (``batch_argnums``; default the
            last positional argument) dynamic, so a short last batch reuses the graph.
            Inductor may still pick kernels by batch-size range (on CPU: sum reductions
            over more than 4096 rows, matmuls with a width-1 side and under ~32
            elements), which costs one more compile per range, never one per size.
        mode: ``torch.compile`` mode, e.g. ``"reduce-overhead"`` (CUDA graphs) or
            ``"max-autotune"``.
        fullgraph: refuse graph breaks (a break means a host round trip mid-step).
        disable: run eagerly (default: the ``LIGHTFN_DISABLE_JIT`` environment variable).
        guard_globals: re-check, on every call, everything the function reached through
            module globals (functions, modules, constants) and recompile if it changed.
            Off by default, as in ``jax.jit``: what the function reads from globals is
            fixed when it is first traced (pass changing values as arguments). The
            arguments themselves (tensor shapes, dtypes, devices, pytree structure) and
            closed-over values are always checked. The check costs ~0.5 ms per call on the
            seed autoencoder's step (~2000 guards), a third of the step on a 2-core CPU.
        cache: keep the compiled function as an ahead-of-time artifact in lightfn's cache
            folder, so a later process loads it instead of tracing again
            (:mod:`lightfn._compile.aot`; default: the ``LIGHTFN_AOT`` environment variable, off
            when unset). Only for the default inductor backend without ``mode`` or
            ``guard_globals``; a function it cannot capture compiles as usual, with one
            line saying why.

    Usable as ``lf.jit(f)``, ``lf.jit(f, donate=True)`` or ``@lf.jit(donate=True)``.
    """
    if fn is None:
        return functools.partial(
            jit, donate=donate, dynamic_batch=dynamic_batch, batch_argnums=batch_argnums, mode=mode,
            fullgraph=fullgraph, disable=disable, backend=backend, options=options, guard_globals=guard_globals,
            cache=cache,
        )
    if isinstance(fn, Jitted):
        return fn
    compiled = not (jit_disabled() if disable is None else disable)
    use_cache = _aot.enabled_by_env() if cache is None else cache
    if use_cache and (backend != "inductor" or mode is not None or guard_globals or not fullgraph):
        if cache:  # asked for explicitly: say why it does not apply
            warnings.warn("lf.jit(cache=True) applies to backend='inductor' with fullgraph and without mode or "
                          "guard_globals; compiling with torch.compile", stacklevel=2)
        use_cache = False
    kwargs: dict[str, Any] = {"fullgraph": fullgraph, "backend": backend, "dynamic": None if dynamic_batch else False}
    opts = dict(options or {})
    if not guard_globals:
        if mode is not None and backend == "inductor":
            # torch.compile takes a mode or options, not both: spell the mode as its options.
            from torch._inductor import list_mode_options

            opts = {**list_mode_options(mode), **opts}
            mode = None
        if mode is None:
            opts["guard_filter_fn"] = torch.compiler.skip_guard_on_globals_unsafe
    if compiled and backend == "inductor" and mode is None:
        opts = {**isa_options(), **opts}  # skip inductor's per-cache-dir ISA test builds (lightfn/_compile/isa.py)
    if mode is not None:
        kwargs["mode"] = mode
    if opts:
        kwargs["options"] = opts
    return Jitted(
        fn,
        donate=donate,
        dynamic_batch=dynamic_batch,
        batch_argnums=tuple(batch_argnums) if batch_argnums is not None else None,
        compiled=compiled,
        compile_kwargs=kwargs,
        cache=use_cache,
    )
