#!/usr/bin/env bash
# Fetch and unpack PASCAL VOC 2007 (trainval, test images, test annotations) into DIR/VOCdevkit/VOC2007,
# the layout eval_svm.py reads. Needs internet; nothing in the repo downloads at run time.
# usage: scripts/download_voc07.sh DIR
set -euo pipefail
DIR=${1:?usage: scripts/download_voc07.sh DIR}
BASE=${VOC_MIRROR:-http://host.robots.ox.ac.uk/pascal/VOC/voc2007}
mkdir -p "$DIR/tmp"
for f in VOCtrainval_06-Nov-2007.tar VOCtest_06-Nov-2007.tar VOCtestnoimgs_06-Nov-2007.tar; do
  if [ ! -s "$DIR/tmp/$f" ]; then
    echo "downloading $BASE/$f"
    curl -fL --retry 3 -o "$DIR/tmp/$f.part" "$BASE/$f"
    mv "$DIR/tmp/$f.part" "$DIR/tmp/$f"
  fi
  tar -xf "$DIR/tmp/$f" -C "$DIR"
done
test -f "$DIR/VOCdevkit/VOC2007/ImageSets/Main/aeroplane_test.txt" || { echo "test annotations missing" >&2; exit 1; }
echo "VOC2007 ready: $DIR/VOCdevkit/VOC2007 ($(ls "$DIR/VOCdevkit/VOC2007/JPEGImages" | wc -l) images)"
echo "remove $DIR/tmp to reclaim the archives' space"
