"""Compiling steps once: what lets a later process skip tracing (results in seconds).

- ``aot``: the ahead-of-time artifact cache for pure steps (``lf.jit(fn, cache=True)``,
  ``LIGHTFN_AOT=1``): capture without dynamo, export, AOTInductor, load in a later process;
- ``key``: the fingerprint of what a step computes (its code, closures, inputs, versions);
- ``store``: the artifacts on disk (manifest, integrity, atomic writes, size bound);
- ``cache``: lightfn's cache folder (``LIGHTFN_CACHE_DIR``);
- ``isa``: inductor's CPU instruction-set probe, answered once per machine.

Private: ``lf.jit`` (:mod:`lightfn.transforms`) is the public entry point.
"""
