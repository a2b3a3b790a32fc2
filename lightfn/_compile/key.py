"""A fingerprint of what a step computes, for the ahead-of-time artifact cache (lightfn/_compile/aot.py).

A cached compiled step may be reused by a later process only if that process would trace
the same graph. The graph depends on the step's code and on every value the code closes
over or reads from module globals (a learning rate in an optimizer's closure, a loss
weight, an ``nn.Module``'s attributes, a tensor constant). :func:`fingerprint` walks all of
it and feeds it into a sha256:

* functions: their code objects (bytecode, constants, names; not file names or line
  numbers, so moving a function or adding a comment keeps its key), defaults, closure
  cells and, for user code, the globals the code names (recursively);
* ``functools.partial``: the function, args and keywords; bound methods: self and function;
* dataclasses, named tuples, ``nn.Module``s and other plain objects: their type and fields;
* tensors: shape, dtype, device and a hash of their values;
* code from torch, lightfn, the standard library and installed packages is named, not
  walked: those are covered by the versions in the key (lightfn's by a hash of its source).

Anything else (a lock, a generator, a C object without a known meaning) makes the
fingerprint unreliable: :func:`fingerprint` then raises :class:`Unfingerprintable` and the
caller compiles without the cache rather than risk reusing a stale graph.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any

import torch

__all__ = ["Unfingerprintable", "fingerprint", "lightfn_source_hash"]

_MAX_DEPTH = 64
_LIBRARY_ROOTS = ("torch", "lightfn", "optree", "numpy", "functools", "builtins", "typing", "math", "operator")


class Unfingerprintable(Exception):
    """The step reaches a value whose meaning cannot be hashed reliably."""


def lightfn_sources() -> tuple[Path, tuple[Path, ...]]:
    """``(root, files)``: the lightfn package folder and every ``.py`` file below it (this
    module lives in ``lightfn/_compile``, so the root is two levels up)."""
    root = Path(__file__).resolve().parents[1]
    return root, tuple(sorted(root.rglob("*.py")))


@functools.cache
def lightfn_source_hash() -> str:
    """sha256 of lightfn's own source files: an edited lightfn is a new version for the cache."""
    root, files = lightfn_sources()
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _library_paths() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(sorted({str(Path(paths[k]).resolve()) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}))


@functools.cache
def _is_library(module_name: str | None) -> bool:
    """True for code whose version the key covers elsewhere (torch, lightfn) or that is installed."""
    if not module_name:
        return False
    top = module_name.split(".")[0]
    if top in _LIBRARY_ROOTS or top in sys.builtin_module_names:
        return True
    mod = sys.modules.get(top)
    file = getattr(mod, "__file__", None) if mod is not None else None
    if not file:
        return False
    return _is_library_file(file)


@functools.cache
def _is_library_file(filename: str) -> bool:
    resolved = str(Path(filename).resolve())
    return any(resolved.startswith(p + "/") for p in _library_paths())


def _library_version(module_name: str) -> str:
    top = module_name.split(".")[0]
    if top == "lightfn":
        return lightfn_source_hash()
    mod = sys.modules.get(top)
    return str(getattr(mod, "__version__", "")) if mod is not None else ""


class _Hasher:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.seen: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps walked objects alive so their ids stay unique

    def tag(self, *parts: Any) -> None:
        self.h.update(repr(parts).encode())
        self.h.update(b"\x00")

    def feed(self, obj: Any, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise Unfingerprintable(f"values nested deeper than {_MAX_DEPTH} levels")
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            self.tag(type(obj).__name__, obj)
            return
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            self.tag("torch", str(obj))
            return
        if isinstance(obj, enum.Enum):
            self.tag("enum", type(obj).__module__, type(obj).__qualname__, obj.name)
            return
        ident = id(obj)
        if ident in self.seen:  # a cycle or a shared object: refer back to its first visit
            self.tag("ref", self.seen[ident])
            return
        self.seen[ident] = len(self.seen)
        self.keep.append(obj)
        self._feed_container(obj, depth + 1)

    def _feed_container(self, obj: Any, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            self._feed_tensor(obj)
        elif isinstance(obj, (tuple, list)):
            self.tag(type(obj).__module__, type(obj).__qualname__, len(obj))
            if type(obj) not in (tuple, list):  # a named tuple: its class matters (fields, methods)
                self._feed_type(type(obj), depth)
            for x in obj:
                self.feed(x, depth)
        elif isinstance(obj, dict):
            self.tag(type(obj).__qualname__, len(obj))
            for k, v in obj.items():
                self.feed(k, depth)
                self.feed(v, depth)
        elif isinstance(obj, (set, frozenset)):
            parts = []
            for x in obj:
                sub = _Hasher()
                sub.feed(x)
                parts.append(sub.h.hexdigest())
            self.tag(type(obj).__name__, sorted(parts))
        elif isinstance(obj, types.CodeType):
            self._feed_code(obj, depth)
        elif isinstance(obj, types.FunctionType):
            self._feed_function(obj, depth)
        elif isinstance(obj, functools.partial):
            self.tag("partial")
            self.feed(obj.func, depth)
            self.feed(obj.args, depth)
            self.feed(obj.keywords, depth)
        elif isinstance(obj, types.MethodType):
            self.tag("method")
            self.feed(obj.__func__, depth)
            self.feed(obj.__self__, depth)
        elif isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            owner = getattr(obj, "__self__", None)
            if owner is not None and not isinstance(owner, types.ModuleType) and not isinstance(owner, type):
                raise Unfingerprintable(f"a built-in method bound to a {type(owner).__name__}")
            self.tag("builtin", getattr(obj, "__module__", None), getattr(obj, "__qualname__", str(obj)))
        elif isinstance(obj, types.ModuleType):
            self.tag("module", obj.__name__, _library_version(obj.__name__) if _is_library(obj.__name__) else "")
        elif isinstance(obj, type):
            self._feed_type(obj, depth)
        elif type(obj).__name__ == "PyTreeSpec":  # optree's structure: its text names types and keys
            self.tag("treespec", str(obj))
        elif dataclasses.is_dataclass(obj):
            self._feed_type(type(obj), depth)
            for f in dataclasses.fields(obj):
                self.feed(f.name, depth)
                self.feed(getattr(obj, f.name), depth)
        else:
            self._feed_object(obj, depth)

    def _feed_tensor(self, x: torch.Tensor) -> None:
        if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
            raise Unfingerprintable(f"a closed-over tensor of type {type(x).__name__}")
        self.tag("tensor", tuple(x.shape), str(x.dtype), str(x.device), x.requires_grad)
        if x.device.type == "meta":
            return
        data = x.detach().contiguous().cpu().reshape(-1)
        self.h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")

    def _feed_code(self, code: types.CodeType, depth: int) -> None:
        self.tag(
            "code", code.co_name, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags,
            code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
        )
        self.h.update(code.co_code)
        for c in code.co_consts:
            self.feed(c, depth)

    def _feed_function(self, fn: types.FunctionType, depth: int) -> None:
        module = fn.__module__ or ""
        # Judged by where the code lives, not by sys.modules: under `python -m cProfile` or
        # runpy, a script's functions say __main__ while sys.modules["__main__"] is the runner.
        library = module.split(".")[0] in _LIBRARY_ROOTS or _is_library_file(fn.__code__.co_filename)
        self.tag("function", fn.__qualname__, module if library else "", _library_version(module) if library else "")
        self._feed_code(fn.__code__, depth)
        self.feed(fn.__defaults__, depth)
        self.feed(fn.__kwdefaults__, depth)
        for cell in fn.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later in the enclosing scope)
                self.tag("empty cell")
                continue
            self.feed(value, depth)
        if not library:
            # What user code reads from globals is fixed when it is traced: it is part of the graph.
            g = fn.__globals__
            for name in sorted(_global_names(fn.__code__)):
                if name in g:
                    self.tag("global", name)
                    value = g[name]
                    if isinstance(value, types.ModuleType) and not _is_library(value.__name__):
                        self._feed_user_module(value, fn.__code__, depth)
                    else:
                        self.feed(value, depth)

    def _feed_user_module(self, mod: types.ModuleType, code: types.CodeType, depth: int) -> None:
        # A user module used as `mod.fn(...)`: its attributes the code names are part of the step.
        self.tag("user module", mod.__name__)
        for name in sorted(_global_names(code)):
            if name in vars(mod):
                self.tag("attr", name)
                self.feed(vars(mod)[name], depth)

    def _feed_type(self, cls: type, depth: int) -> None:
        module = cls.__module__
        if _is_library(module):
            self.tag("type", module, cls.__qualname__, _library_version(module))
            return
        self.tag("user type", cls.__qualname__)
        for klass in cls.__mro__:
            if _is_library(klass.__module__):
                self.tag("base", klass.__module__, klass.__qualname__)
                continue
            for name, value in sorted(vars(klass).items()):
                if isinstance(value, (types.FunctionType, staticmethod, classmethod, property)):
                    self.tag("member", name)
                    target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if target is not None:
                        self.feed(target, depth)
                elif not name.startswith("__"):
                    self.tag("class attr", name)
                    self.feed(value, depth)

    def _feed_object(self, obj: Any, depth: int) -> None:
        cls = type(obj)
        state = getattr(obj, "__dict__", None)
        slots = [s for k in cls.__mro__ for s in getattr(k, "__slots__", ()) if s not in ("__dict__", "__weakref__")]
        if state is None and not slots:
            raise Unfingerprintable(f"a {cls.__module__}.{cls.__qualname__} (no fields to read)")
        if _is_library(cls.__module__) and not isinstance(obj, torch.nn.Module) and state is None:
            raise Unfingerprintable(f"a {cls.__module__}.{cls.__qualname__}")
        self._feed_type(cls, depth)
        for s in slots:
            self.feed(s, depth)
            self.feed(getattr(obj, s, None), depth)
        if state is not None:
            if not isinstance(state, dict):
                raise Unfingerprintable(f"a {cls.__qualname__} whose __dict__ is a {type(state).__name__}")
            self.feed(state, depth)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def fingerprint(*objs: Any) -> str:
    """sha256 (hex) of ``objs``' meaning as described in the module docs.

    Raises :class:`Unfingerprintable` when some reachable value cannot be hashed reliably.
    """
    h = _Hasher()
    for obj in objs:
        h.feed(obj)
    return h.h.hexdigest()
