#!/usr/bin/env bash
# One node, one process per GPU (the official --multiprocessing-distributed launcher) with a config.
# usage: scripts/pretrain_one_node.sh CONFIG IMAGENET_DIR EXP_DIR [extra main_pcl.py flags]
# Re-running the same command resumes (--resume auto: the newest readable checkpoint in EXP_DIR). SIGTERM or
# SIGUSR1 stops it after the current step with a checkpoint saved (exit code 75); rerun to continue.
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 CONFIG IMAGENET_DIR EXP_DIR [flags]" >&2; exit 2; fi
CONFIG=$1; DATA=$2; EXP=$3; shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
CMD=(python "$root/main_pcl.py" -c "$CONFIG" --exp-dir "$EXP"
     --dist-url "tcp://localhost:${PORT:-10001}" --multiprocessing-distributed --world-size 1 --rank 0
     --resume auto "$@" "$DATA")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
