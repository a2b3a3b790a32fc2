"""Ahead-of-time artifact cache for pure steps: a later process loads the compiled step.

``torch.compile`` re-traces a step in every new process (seconds, even with a warm
inductor cache). For a pure step, lightfn can instead capture the graph once and keep the
compiled result as a file: :func:`compile_cached` captures the function with ``make_fx``
(no dynamo) on fake tensors, exports the graph with ``torch.export`` (the batch dimension
dynamic), compiles it with AOTInductor into a ``.pt2`` package under lightfn's cache folder
(:mod:`lightfn._compile.cache`, subfolder ``aot``), and loads it. A later process with the same key
loads the package without tracing.

The key is a sha256 of everything the graph depends on: the function's code and the values
it closes over (:mod:`lightfn._compile.key`), the input tree's structure, shapes (dynamic dims
masked), dtypes and devices, non-tensor inputs (closed over as constants), grad mode and
default dtype, the inductor options, and the torch, Python and lightfn versions (lightfn's
as a hash of its source). A changed loss is a new key, never a stale graph.

Files, atomic writes, integrity checks and the size bound: :mod:`lightfn._compile.store`. A
corrupted artifact is rebuilt with a one-line warning, never loaded.

What cannot be captured (collectives, data-dependent control flow, a value the key cannot
fingerprint) raises :class:`Unsupported`; :mod:`lightfn.transforms` then compiles with
``torch.compile`` as before. :func:`stats` counts traces, builds and loads for tests.

Over ~300 lines: capture, export, build and load are one path that must agree on the
input encoding; the key, the storage and the calling convention live in :mod:`.key`,
:mod:`.store` and :mod:`.flat`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .flat import CachedStep, Inputs, Unsupported, _encode
from .key import Unfingerprintable, fingerprint, lightfn_source_hash
from .store import build_lock, evict, load, open_package, read_manifest, write_package
from .cache import cache_dir, write_text_atomic
from .._diagnostics import first_line
from ..errors import LightfnError

__all__ = ["CachedStep", "Unsupported", "Prepared", "compile_cached", "prepare", "stats", "reset_stats", "artifact_key", "enabled_by_env"]

_FORMAT = "lightfn-aot-1"
# Options that change how inductor gets its answer, not the answer: left out of the key.
_NOT_KEYED = ("cpp.vec_isa_ok", "guard_filter_fn")
# Process-wide counts of what the cache did, read by tests (never a timer).
_STATS: Counter[str] = Counter()


def stats() -> dict[str, int]:
    """Counts since the last :func:`reset_stats`: traces, builds, loads, rebuilds, fallbacks."""
    return {k: _STATS[k] for k in ("traces", "builds", "loads", "rebuilds", "fallbacks")}


def reset_stats() -> None:
    _STATS.clear()


def count(what: str) -> None:
    _STATS[what] += 1


def enabled_by_env() -> bool:
    """True when ``LIGHTFN_AOT=1`` is set: ``lf.jit`` then uses the cache by default."""
    return os.environ.get("LIGHTFN_AOT", "").strip().lower() in ("1", "true", "yes")



def artifact_key(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *,
                 dynamic_argnums: Sequence[int] = (), options: dict[str, Any] | None = None, static: bool = False) -> str:
    """The cache key of ``fn`` called on ``args`` (see module docs); raises :class:`Unsupported`."""
    inputs = Inputs(args, kwargs or {}, dynamic_argnums, static)
    return _key(fn, inputs, options or {})


def _key(fn: Callable[..., Any], inputs: Inputs, options: dict[str, Any]) -> str:
    try:
        code = fingerprint(fn)
        described = inputs.describe()
        opts = {k: fingerprint(v) for k, v in sorted(options.items()) if k not in _NOT_KEYED}
    except Unfingerprintable as e:
        raise Unsupported(f"cannot fingerprint the step: it reaches {e}") from None
    env = {
        "torch": torch.__version__, "python": sys.version, "lightfn": lightfn_source_hash(), "machine": platform.machine(),
        "cpu": torch.backends.cpu.get_cpu_capability(), "grad": torch.is_grad_enabled(),
        "default_dtype": str(torch.get_default_dtype()), "deterministic": torch.are_deterministic_algorithms_enabled(),
        "autocast": torch.is_autocast_enabled(),
        # Ranks never share an artifact (a sharded step's shapes or constants may differ per rank).
        "rank": os.environ.get("RANK", ""), "world": os.environ.get("WORLD_SIZE", ""),
    }
    blob = json.dumps([_FORMAT, code, described, opts, env], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]



# ---------------------------------------------------------------------------- capture


def _capture(fn: Callable[..., Any], inputs: Inputs) -> tuple[Any, Any, bool]:
    """``(graph module, output spec, batch guarded)``: ``fn`` traced to aten ops on fake inputs.

    Fake tensors: nothing runs, so donated inputs are not mutated by the capture. Dim 0 of
    the batch leaves is symbolic (one symbol per distinct size, as equal batch sizes are
    usually meant to be equal); a guard on it means the graph is only valid for some batch
    sizes, and the caller then builds for the exact size.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    fake_mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    fakes = []
    for x, dyn in zip(inputs.tensors, inputs.dynamic):
        sizes = [DimDynamic.DUCK if dyn and d == 0 else DimDynamic.STATIC for d in range(x.dim())]
        fakes.append(fake_mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)))
    spec: list[Any] = []

    def flat_fn(*tensors: torch.Tensor) -> list[torch.Tensor]:
        args, kwargs = inputs.rebuild(tensors)
        # Only the function runs "compiling": lightfn.tree then flattens with torch's pytree
        # (another leaf order), which must not reach the input/output specs kept here.
        with _compiling():
            result = fn(*args, **kwargs)
        outs: list[torch.Tensor] = []
        spec.append(_encode(result, inputs.arg_defs, outs))
        return outs

    count("traces")
    with fake_mode:
        gm = make_fx(flat_fn, tracing_mode="real")(*fakes)
    for node in gm.graph.nodes:
        if node.op == "call_function" and "c10d" in str(node.target):
            # A collective's process group is a name baked into the graph; a cached graph
            # must not carry it into another process.
            raise Unsupported(f"the step calls a collective ({node.target})")
    guarded = any(g.expr.free_symbols for g in shape_env.guards)
    return gm, spec[0], guarded


def _compiling() -> Any:
    """``torch.compiler.is_compiling()`` is True inside: code that takes a traced path under
    torch.compile (lightfn's optimizers realize their 0-d bias corrections once per step
    instead of a float64 pow per vector of every kernel) must take it here too, or the
    cached step is slower than ``lf.jit``'s. The context torch's own make_fx-based export
    uses; absent from a torch version, capture still works, only without that path."""
    try:
        from torch._export.utils import _compiling_state_context
    except ImportError:  # pragma: no cover - torch versions without it
        return contextlib.nullcontext()
    return _compiling_state_context()


def _export(gm: Any, inputs: Inputs) -> Any:
    dims: dict[int, Any] = {}
    shapes = []
    for x, dyn in zip(inputs.tensors, inputs.dynamic):
        if dyn:
            size = int(x.shape[0])
            if size not in dims:
                dims[size] = torch.export.Dim(f"batch{len(dims)}", min=2)
            shapes.append({0: dims[size]})
        else:
            shapes.append(None)
    return torch.export.export(gm, tuple(inputs.tensors), dynamic_shapes=tuple(shapes), strict=False)


# ------------------------------------------------------------------------------ entry


def compile_cached(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic_argnums: Sequence[int] = (),
    options: dict[str, Any] | None = None,
    folder: Path | None = None,
    build_options: Callable[[], dict[str, Any]] | None = None,
    build: bool = True,
    load_step: bool = True,
) -> CachedStep | None:
    """Load (or build, store and load) the compiled ``fn`` for arguments like ``args``.

    ``build=False``: only load; ``None`` when the cache has no artifact (nothing is traced).
    ``load_step=False``: only make sure the artifact is stored (build it if missing) and
    return ``None`` (a background builder, :mod:`lightfn._compile.background`).

    ``dynamic_argnums``: positional arguments whose tensors' dim 0 is a dynamic batch dim.
    ``options``: inductor options (part of the key); ``build_options()``: more options
    asked only when a build is needed (e.g. the ISA probe's record, which is costly to read
    and not part of the key). Nothing runs on ``args``' values:
    capture uses fake tensors. Raises :class:`Unsupported` (with a short reason) when
    ``fn`` cannot be cached; errors a user can act on (:class:`LightfnError`) pass through.
    """
    kwargs = kwargs or {}
    options = dict(options or {})
    folder = folder if folder is not None else cache_dir() / "aot"
    inputs, key, step = _find(fn, args, kwargs, dynamic_argnums, options, folder, load_step)
    if step is None and build:
        with build_lock(folder):
            # Another process may have built it while this one waited for the lock (what
            # was found corrupted above is not reported twice).
            inputs, key, step = _find(fn, args, kwargs, dynamic_argnums, options, folder, load_step, quiet=True)
            if step is None:
                step = _build(fn, args, kwargs, inputs, key, dynamic_argnums=dynamic_argnums, options=options,
                              folder=folder, build_options=build_options, load_step=load_step)
    return None if step is _STORED else step


def _find(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_argnums: Sequence[int],
          options: dict[str, Any], folder: Path, load_step: bool, quiet: bool = False) -> tuple[Inputs, str, Any]:
    """``(inputs, key, step)``: the step is the loaded artifact (or _STORED), None on a miss.
    ``quiet``: a corrupted artifact is not warned about (nor counted)."""
    inputs = Inputs(args, kwargs, dynamic_argnums, static=False)
    key = _key(fn, inputs, options)
    manifest = _existing(folder, key, quiet)
    if manifest is not None and manifest.get("static"):
        inputs = Inputs(args, kwargs, dynamic_argnums, static=True)  # graph valid for one batch size
        key = _key(fn, inputs, options)
        manifest = _existing(folder, key, quiet)
    if manifest is None:
        return inputs, key, None
    return inputs, key, _load(folder, key, manifest, dynamic_argnums, not any(inputs.dynamic), load_step, quiet)


_STORED = object()  # _load's answer when the artifact is verified but not wanted in this process


def _load(folder: Path, key: str, manifest: dict[str, Any], dynamic_argnums: Sequence[int], static: bool,
          load_step: bool, quiet: bool = False) -> Any:
    """The loaded step (or _STORED), or None when the artifact must be (re)built."""
    if not load_step:
        return _STORED if (folder / str(manifest.get("package", ""))).is_file() else None
    try:
        model = load(folder, key, manifest)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, OSError) as e:
        if not quiet:
            warnings.warn(f"lightfn AOT cache: artifact {key} is corrupted ({e}); rebuilding it", stacklevel=4)
            count("rebuilds")
        return None
    count("loads")
    return CachedStep(model, manifest["out_spec"], path=folder / manifest["package"], dynamic_argnums=dynamic_argnums,
                      static=static)


def _build(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], inputs: Inputs, key: str, *,
           dynamic_argnums: Sequence[int], options: dict[str, Any], folder: Path,
           build_options: Callable[[], dict[str, Any]] | None, load_step: bool) -> CachedStep | None:
    prepared = _prepare(fn, args, kwargs, inputs, key, dynamic_argnums=dynamic_argnums, options=options,
                        folder=folder, load_step=load_step)
    if not isinstance(prepared, Prepared):
        return None if prepared is _STORED else prepared  # found under the exact-size key
    return prepared.package(build_options, load_step=load_step)


class Prepared:
    """A captured and exported step, not yet compiled: :meth:`package` compiles it with
    AOTInductor and stores it (the slow half, which needs no autograd)."""

    def __init__(self, ep: Any, out_spec: Any, *, key: str, folder: Path, options: dict[str, Any],
                 dynamic_argnums: Sequence[int], static: bool) -> None:
        self.ep, self.out_spec, self.key, self.folder = ep, out_spec, key, folder
        self.options, self.dynamic_argnums, self.static = options, tuple(dynamic_argnums), static

    def package(self, build_options: Callable[[], dict[str, Any]] | None = None, *,
                load_step: bool = False) -> CachedStep | None:
        folder, key = self.folder, self.key
        try:
            built_with = self.options if build_options is None else {**build_options(), **self.options}
            path, size, sha = write_package(folder, key, self.ep, built_with)
        except (LightfnError, Unsupported):
            raise
        except Exception as e:  # noqa: BLE001 - whatever AOTInductor refuses
            raise Unsupported(first_line(e)) from e
        manifest = {"key": key, "package": path.name, "size": size, "sha256": sha, "out_spec": self.out_spec,
                    "torch": torch.__version__}
        write_text_atomic(folder / f"{key}.json", json.dumps(manifest))
        count("builds")
        evict(folder, keep=key)
        if not load_step:
            return None
        return CachedStep(open_package(path), self.out_spec, path=path, dynamic_argnums=self.dynamic_argnums,
                          static=self.static)


def prepare(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *,
            dynamic_argnums: Sequence[int] = (), options: dict[str, Any] | None = None,
            folder: Path | None = None) -> Prepared | None:
    """Capture and export ``fn`` for arguments like ``args`` (None when the cache already
    holds it): the half of a build that runs autograd, for a process whose forked children
    cannot (:mod:`lightfn._compile.background`). Raises :class:`Unsupported`."""
    kwargs = kwargs or {}
    options = dict(options or {})
    folder = folder if folder is not None else cache_dir() / "aot"
    inputs, key, step = _find(fn, args, kwargs, dynamic_argnums, options, folder, load_step=False)
    if step is not None:
        return None
    prepared = _prepare(fn, args, kwargs, inputs, key, dynamic_argnums=dynamic_argnums, options=options,
                        folder=folder, load_step=False)
    return prepared if isinstance(prepared, Prepared) else None


def _prepare(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], inputs: Inputs, key: str, *,
             dynamic_argnums: Sequence[int], options: dict[str, Any], folder: Path, load_step: bool) -> Any:
    """A :class:`Prepared` step, or what the cache holds under the exact-size key."""
    static = not any(inputs.dynamic)
    try:
        gm, out_spec, guarded = _capture(fn, inputs)
        if guarded and not static:
            # Python branched on the batch size: record that, and build for this size only.
            write_text_atomic(folder / f"{key}.json", json.dumps({"key": key, "static": True}))
            static_inputs = Inputs(args, kwargs, dynamic_argnums, static=True)
            static_key = _key(fn, static_inputs, options)
            manifest = _existing(folder, static_key)
            if manifest is not None:
                step = _load(folder, static_key, manifest, dynamic_argnums, True, load_step)
                if step is not None:
                    return step
            return _prepare(fn, args, kwargs, static_inputs, static_key, dynamic_argnums=dynamic_argnums,
                            options=options, folder=folder, load_step=load_step)
        ep = _export(gm, inputs)
    except (LightfnError, Unsupported):
        raise
    except Exception as e:  # noqa: BLE001 - whatever capture or export refuse
        raise Unsupported(first_line(e)) from e
    return Prepared(ep, out_spec, key=key, folder=folder, options=options, dynamic_argnums=dynamic_argnums,
                    static=static)


def _existing(folder: Path, key: str, quiet: bool = False) -> dict[str, Any] | None:
    try:
        return read_manifest(folder, key)
    except (ValueError, OSError) as e:
        if quiet:
            return None
        warnings.warn(f"lightfn AOT cache: manifest {key}.json is corrupted ({e}); rebuilding it", stacklevel=3)
        count("rebuilds")
        return None
