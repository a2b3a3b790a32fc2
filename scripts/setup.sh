#!/usr/bin/env bash
# Create .venv (once) and install lightfn with its test and ONNX extras into it.
# Idempotent: a second run only re-checks the install. Works offline against the
# machine's package index; torch comes from pip's configured source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e ".[dev]"
