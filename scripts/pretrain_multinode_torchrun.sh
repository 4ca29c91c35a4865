#!/usr/bin/env bash
# Multi-node PCL pretraining with torchrun: run this on every node with its NODE_RANK.
# usage: scripts/pretrain_multinode_torchrun.sh IMAGENET_DIR EXP_DIR NNODES NODE_RANK MASTER_ADDR [flags]
# e.g. 2 nodes x 8 GPUs: batch 256 total as the paper (add e.g. --batch-size 512 --lr 0.06 to scale).
# k-means and checkpoints run once per job (global rank 0), not once per node. Rerunning resumes (--resume auto).
set -euo pipefail
if [ $# -lt 5 ]; then echo "usage: $0 IMAGENET_DIR EXP_DIR NNODES NODE_RANK MASTER_ADDR [flags]" >&2; exit 2; fi
DATA=$1; EXP=$2; NNODES=$3; NODE_RANK=$4; MASTER=$5; shift 5
# torchrun passes SIGTERM (and, listed here, SLURM's SIGUSR1) on to its workers, then kills them after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (torch's default 30 s is too short for the last step plus a ResNet-50 save on a
# busy filesystem; 170 s fits inside SLURM's --signal lead of 180 s). PET_SIGNALS_TO_HANDLE is the default of
# torchrun's --signals-to-handle (which overwrites TORCHELASTIC_SIGNALS_TO_HANDLE); older torchruns ignore these.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}
root=$(cd "$(dirname "$0")/.." && pwd)
CMD=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${GPUS_PER_NODE:-8}"
     --master_addr "$MASTER" --master_port "${PORT:-29500}"
     "$root/main_pcl.py" --dist-url env:// -c "${CONFIG:-$root/configs/pcl_v2_imagenet.yaml}" --exp-dir "$EXP"
     --resume auto "$@" "$DATA")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
