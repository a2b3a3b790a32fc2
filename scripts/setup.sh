#!/usr/bin/env bash
# Create .venv (once) and install lightfn with its test and ONNX extras into it.
# Idempotent and quick when nothing changed: the install is skipped while a stamp of
# pyproject.toml (dependencies, extras) and of the interpreter matches what was installed,
# because pip re-checking an editable install costs about 4 s on every run of the main job.
# Works offline against the machine's package index; torch comes from pip's configured source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
STAMP=.venv/.lightfn-install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -I -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("lightfn") is None)'; then
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$STAMP"
fi
