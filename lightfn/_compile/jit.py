"""``lf.jit``: ``torch.compile`` with lightfn's defaults, or the ahead-of-time cache.

The whole function in one graph (``fullgraph=True``), the batch dimension dynamic so a
short last batch does not recompile, optional donation of argument 0 (the state), and a
short actionable error instead of a dynamo trace. With ``cache=True`` (or
``LIGHTFN_AOT=1``) compiled steps come from :mod:`lightfn._compile.aot`, so a later process
loads them without tracing. Public as ``lf.jit`` / ``lightfn.transforms.jit``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import tree
from .._diagnostics import first_line, fn_name, user_frame
from .._quiet import compile_messages_quieted
from ..errors import CompileError, LightfnError, StepError
from . import aot as _aot
from . import flat as _flat
from .background import Switching
from .isa import isa_options, remember_isa_probe

__all__ = ["jit", "Jitted", "jit_disabled", "eager_failure"]



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
        isa: bool = False,
        background: bool = False,
    ) -> None:
        self.fn = fn
        self.donate = donate
        self.dynamic_batch = dynamic_batch
        self.batch_argnums = batch_argnums
        self.compiled = compiled
        self.cache = compiled and cache
        self._target = _donating(fn) if donate else fn
        self._compile_kwargs = compile_kwargs
        # The ISA probe's record (isa_options) is read only when something compiles: reading
        # it imports inductor (and dynamo, ~1.5 s), which a step loaded from the AOT cache
        # never needs.
        self._isa = isa
        # With the cache, torch.compile (and importing dynamo, ~1 s) waits for a fallback.
        self._compiled: Callable[..., Any] | None = None
        if not compiled:
            self._compiled = self._target
        elif not self.cache:
            self._compiled = self._torch_compile()
        self._cached: dict[Any, Any] = {}  # call signature -> lightfn._compile.flat.CachedStep
        self._calls: dict[Any, Any] = {}  # flat.call_key -> (CachedStep, tensor mask, decoder)
        self._isa_recorded = not compiled  # after the first compiled call: lightfn/_compile/isa.py
        self.background: Switching | None = Switching(self) if self.cache and background else None
        functools.update_wrapper(self, fn)

    def _torch_compile(self) -> Callable[..., Any]:
        kwargs = dict(self._compile_kwargs)
        if self._isa:
            kwargs["options"] = {**isa_options(), **kwargs.get("options", {})}
        return torch.compile(self._target, **kwargs)

    def _batch_argnums(self, args: tuple[Any, ...]) -> tuple[int, ...]:
        if not self.dynamic_batch:
            return ()
        return self.batch_argnums if self.batch_argnums is not None else (len(args) - 1,)

    @property
    def switched_at(self) -> int | None:
        """With ``background=True``: the number of calls made before the first compiled
        one (0: loaded from the cache at once), or None while it still runs eagerly."""
        return None if self.background is None else self.background.switched_at

    def eager(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function without compiling (donation applied, as compiled)."""
        return self._target(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.compiled:
            return self._target(*args, **kwargs)
        if self.background is not None:
            return self.background(*args, **kwargs)
        if self.cache:
            found = self._cached_step(args, kwargs)
            if found is not None:
                step, tensors, decode = found
                return step.run(tensors, decode)
        if self._compiled is None:
            self._compiled = self._torch_compile()
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

    def cached(self, *args: Any, **kwargs: Any) -> Callable[..., Any] | None:
        """The compiled function applied to these arguments, as a function of no arguments,
        if the AOT cache holds it (loaded once per signature); else None. Nothing is traced
        or built, and nothing warns (a background build reports its own failure)."""
        try:
            found = self._cached_step(args, kwargs, build=False)
        except _aot.Unsupported:
            return None
        if found is None:
            return None
        step, tensors, decode = found
        return functools.partial(step.run, tensors, decode)

    def store(self, *args: Any, **kwargs: Any) -> None:
        """Build the AOT artifact for arguments like these into the cache (if missing),
        without loading it: what a background builder runs. Raises ``Unsupported``."""
        _aot.compile_cached(self._target, args, kwargs, dynamic_argnums=self._batch_argnums(args),
                            options=dict(self._compile_kwargs.get("options", {})),
                            build_options=isa_options if self._isa else None, load_step=False)
        remember_isa_probe()

    def prepare(self, *args: Any, **kwargs: Any) -> Callable[[], None]:
        """Capture and export now (in this process); return the rest of :meth:`store`
        (compile and store), which needs no autograd. Raises ``Unsupported``."""
        prepared = _aot.prepare(self._target, args, kwargs, dynamic_argnums=self._batch_argnums(args),
                                options=dict(self._compile_kwargs.get("options", {})))

        def package() -> None:
            if prepared is not None:
                prepared.package(isa_options if self._isa else None)
                remember_isa_probe()

        return package

    def _cached_step(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                     build: bool = True) -> tuple[Any, list[torch.Tensor], Callable[[Any], Any]] | None:
        """``(CachedStep, its tensor inputs, output decoder)`` for this call, or None after a
        fallback (or, with ``build=False``, when the cache has no artifact; then
        ``Unsupported`` propagates instead of turning the cache off)."""
        try:
            key, leaves = _flat.call_key(args, kwargs)
            hit = self._calls.get(key)
        except TypeError:  # an unhashable constant: the full path below says so
            key, hit = None, None
        if hit is not None:  # the common case, every step after the first: no Inputs, no signature
            step, is_tensor, decode = hit
            return step, [x for x, t in zip(leaves, is_tensor) if t], decode
        found = self._find_step(args, kwargs, build)
        if found is None:
            return None
        step, inputs = found
        decode = _flat.decoder(step.out_spec, inputs.arg_defs)
        if key is not None:
            if len(self._calls) >= 64:  # many shapes (no dynamic batch): keep the table small
                self._calls.clear()
            self._calls[key] = (step, inputs.is_tensor, decode)
        return step, inputs.tensors, decode

    def _find_step(self, args: tuple[Any, ...], kwargs: dict[str, Any], build: bool) -> tuple[Any, Any] | None:
        """``(CachedStep, Inputs)``: looked up by signature, else loaded or built."""
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
                step = _aot.compile_cached(self._target, args, kwargs, dynamic_argnums=nums, options=options,
                                           build_options=isa_options if self._isa else None, build=build)
                if step is None:  # not built (build=False)
                    return None
                self._cached[sig] = step
                if step.static and any(inputs.dynamic):
                    self._cached[("exact", _aot.Inputs(args, kwargs, nums, static=True).signature())] = step
                if not self._isa_recorded:
                    self._isa_recorded = True
                    remember_isa_probe()
        except _aot.Unsupported as e:
            if not build:
                raise
            self.cache = False
            _aot.count("fallbacks")
            warnings.warn(
                f"lf.jit: {getattr(self.fn, '__qualname__', type(self.fn).__name__)} is not in the AOT cache "
                f"({e}); compiling with torch.compile instead",
                stacklevel=4,
            )
            return None
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


def eager_failure(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Exception | None:
    """What ``fn`` raises when run eagerly on copies of ``args`` (None if it runs).

    Asked after a failed trace or compile: a function that is simply wrong (a bad loss, a
    wrong structure) fails eagerly too, and that error is the one to show, not the
    compiler's. Copies, because a function that failed to trace may also be impure and
    the caller's state must come out of a failed first call untouched."""
    copies = tree.map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, (args, kwargs or {}))
    try:
        with torch.no_grad():  # torch.func.grad inside a step ignores an outer no_grad
            fn(*copies[0], **copies[1])
    except Exception as error:  # noqa: BLE001 - returned for the caller to report
        return error
    return None


def _explain_failure(fn: Callable[..., Any], e: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
    eager_error = eager_failure(fn, args, kwargs)
    if isinstance(eager_error, LightfnError):
        return eager_error
    if eager_error is not None:
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
    background: bool = False,
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
        background: never wait for a compile (implies ``cache``). The first call runs
            eagerly unless the cache already holds the artifact, and a forked child process
            builds it meanwhile; each call then checks (a non-blocking read) and, once the
            artifact is built, loads it: from that call on the function runs compiled, and
            a later process loads it before its first call. ``switched_at`` says which call
            switched. Eager and compiled calls agree to float rounding. For CPU work in a
            single process (the build forks); ``lf.fit`` does the same, at recorded steps.

    Usable as ``lf.jit(f)``, ``lf.jit(f, donate=True)`` or ``@lf.jit(donate=True)``.
    """
    if fn is None:
        return functools.partial(
            jit, donate=donate, dynamic_batch=dynamic_batch, batch_argnums=batch_argnums, mode=mode,
            fullgraph=fullgraph, disable=disable, backend=backend, options=options, guard_globals=guard_globals,
            cache=cache, background=background,
        )
    if isinstance(fn, Jitted):
        return fn
    compiled = not (jit_disabled() if disable is None else disable)
    use_cache = background or (_aot.enabled_by_env() if cache is None else cache)
    if use_cache and (backend != "inductor" or mode is not None or guard_globals or not fullgraph):
        if cache or background:  # asked for explicitly: say why it does not apply
            warnings.warn(f"lf.jit({'background' if background else 'cache'}=True) applies to backend='inductor' with "
                          "fullgraph and without mode or guard_globals; compiling with torch.compile", stacklevel=2)
        use_cache = background = False
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
    # inductor's per-cache-dir ISA test builds are skipped (lightfn/_compile/isa.py), read when compiling
    isa = compiled and backend == "inductor" and mode is None
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
        isa=isa,
        background=background,
    )
