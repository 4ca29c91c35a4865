#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py, which lists its sections and what it needs: PyTorch with CUDA,
# torchvision, numpy, PyYAML, tqdm, scikit-learn; pytest and faiss optional). Runs from the checkout as it is
# (nothing is installed; PYTHONPATH points at the repo). Two calls of at most 5 minutes each on one H100, each
# writing its JSON after every section ($OUT/gpu_check.json when $OUT is set):
#   scripts/gpu_check.sh --part 1     # tests, step throughput at batch 32, the fast-path loader, DDP, E-step pass
#   scripts/gpu_check.sh --part 2     # the E-step's k-means (torch, torch-ranks), NCCL launcher, the CPU input side
#   scripts/gpu_check.sh              # both, one after the other
#   scripts/gpu_check.sh --smoke      # every section at toy sizes on the CPU (run by the test suite)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="$(command -v python || command -v python3)"
exec "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
