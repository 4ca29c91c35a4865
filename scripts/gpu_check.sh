#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): cuda-marked tests, AMP throughput, PCL-vs-MoCo step overhead,
# negative sampling, the E-step k-means at ImageNet scale, the PIL pipeline's images/s per core, the --augment device
# worker/device costs and the --kmeans-backend torch-ranks k-means, as one JSON and one table. Runs from the checkout
# as it is (nothing is installed; PYTHONPATH points at the repo), so it works on a machine that has only PyTorch,
# torchvision and scikit-learn.
#   scripts/gpu_check.sh          # on a GPU, about 6-7 minutes on one H100 (a projection: not run on one yet)
#   scripts/gpu_check.sh --cpu    # toy sizes on the CPU (run by the test suite)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python "$ROOT/benchmarks/gpu_check.py" "$@"
