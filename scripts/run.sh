#!/usr/bin/env bash
# The main job: train the seed MNIST autoencoder with lightfn (set-up included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lightfn/inductor}
exec .venv/bin/python examples/autoencoder.py --data-dir ../shared/data/MNIST/raw "$@"
