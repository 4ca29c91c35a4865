#!/usr/bin/env bash
# PCL v1 on ImageNet, one node with 8 GPUs, the paper's settings: linear head, MoCo v1 augmentation, lr steps at 120/160 (configs/pcl_v1_imagenet.yaml).
# usage: scripts/pretrain_pcl_v1_imagenet.sh IMAGENET_DIR EXP_DIR [extra main_pcl.py flags]
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 IMAGENET_DIR EXP_DIR [flags]" >&2; exit 2; fi
root=$(cd "$(dirname "$0")/.." && pwd)
exec "$root/scripts/pretrain_one_node.sh" "$root/configs/pcl_v1_imagenet.yaml" "$@"
