"""Inductor's CPU instruction-set probe, paid once per machine instead of once per cache dir.

Before its first CPU kernel, inductor checks which vector ISAs (avx2, avx512, ...) the C++
compiler can build for this CPU (``torch._inductor.cpu_vec_isa``): per candidate ISA, one
test file that includes ATen's vectorized headers, plus small checks for extensions
(avx512 bf16, vnni). Measured on this 2-core machine: 6 builds, 13-40 s depending on load,
of which the three header builds are 85%. The results are files in
``TORCHINDUCTOR_CACHE_DIR``, so every new cache dir pays again: a fresh checkout's first
run, each rank's own cache dir under ``torchrun``, CI with a cold cache.

The answer depends on the CPU, the compiler and torch, not on the cache dir. So after a
process has run the probe and every ISA the CPU claims built and loaded, lightfn records
that under a fingerprint of those three in its own cache (:mod:`lightfn._compile.cache`). A later
compile with the same fingerprint passes inductor's own ``cpp.vec_isa_ok=True`` option,
which skips the header builds and keeps the same ISA list. The small extension checks still
run: their answers choose compiler flags, so skipping them could change the kernels. A probe where any ISA failed is
never recorded, so such a machine keeps probing; a changed CPU, compiler or torch version
is a new fingerprint. Only x86-64 probes by building; elsewhere this does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from typing import Any

import torch

from .cache import cache_dir, write_text_atomic

__all__ = ["isa_options", "remember_isa_probe"]

_X86 = ("x86_64", "AMD64")


def _claimed() -> list[str]:
    """The ISAs inductor would try on this CPU, before its build check."""
    from torch._inductor import cpu_vec_isa

    flags = cpu_vec_isa.x86_isa_checker()
    return [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]


def _fingerprint() -> str:
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = get_cpp_compiler()
    resolved = shutil.which(compiler) or compiler
    try:
        st = os.stat(os.path.realpath(resolved))
        binary = f"{os.path.realpath(resolved)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        binary = resolved
    parts = [torch.__version__, platform.machine(), binary, *_claimed()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _record_path(fingerprint: str) -> Any:
    return cache_dir() / "isa" / f"{fingerprint}.json"


def isa_options() -> dict[str, Any]:
    """Inductor options for ``torch.compile``: ``{"cpp.vec_isa_ok": True}`` when this
    machine's probe is on record as all-passing, else nothing."""
    if platform.machine() not in _X86:
        return {}
    try:
        fingerprint = _fingerprint()
        record = json.loads(_record_path(fingerprint).read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(record, dict) and record.get("fingerprint") == fingerprint and record.get("valid") == _claimed()
    return {"cpp.vec_isa_ok": True} if ok else {}


def remember_isa_probe() -> bool:
    """Record the probe this process ran, if it ran and every claimed ISA passed.

    Returns True when a record was written. Cheap when there is nothing to do: the probe
    result is read from inductor's in-process cache, never recomputed.
    """
    if platform.machine() not in _X86 or "torch._inductor.cpu_vec_isa" not in sys.modules:
        return False  # inductor never loaded here (e.g. a step loaded from the AOT cache): no probe ran
    from torch._inductor import cpu_vec_isa

    if cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 0:
        return False  # no probe in this process (nothing compiled for CPU yet)
    valid = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
    if valid != _claimed():
        return False  # an ISA the CPU claims did not build: keep probing on this machine
    fingerprint = _fingerprint()
    path = _record_path(fingerprint)
    if path.exists():
        return False
    try:
        write_text_atomic(path, json.dumps({"fingerprint": fingerprint, "valid": valid, "torch": torch.__version__}))
    except OSError:
        return False  # a read-only cache is only a missed saving
    return True
