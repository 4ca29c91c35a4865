#!/usr/bin/env bash
# PCL v2 on ImageNet, one node with 8 GPUs, the paper's settings: mlp, aug-plus, cos (configs/pcl_v2_imagenet.yaml).
# usage: scripts/pretrain_pcl_v2_imagenet.sh IMAGENET_DIR EXP_DIR [extra main_pcl.py flags]
# Re-running the same command resumes from the newest checkpoint in EXP_DIR.
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 IMAGENET_DIR EXP_DIR [flags]" >&2; exit 2; fi
DATA=$1; EXP=$2; shift 2
cd "$(dirname "$0")/.."
RESUME=()
if [ -f "$EXP/checkpoint_last.pth.tar" ]; then RESUME=(--resume "$EXP/checkpoint_last.pth.tar"); fi
CMD=(python main_pcl.py -c configs/pcl_v2_imagenet.yaml --exp-dir "$EXP"
     --dist-url "tcp://localhost:${PORT:-10001}" --multiprocessing-distributed --world-size 1 --rank 0
     "${RESUME[@]}" "$@" "$DATA")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
