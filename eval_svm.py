#!/usr/bin/env python
"""Low-shot transfer with linear SVMs on frozen features (VOC07 mAP; Places205 top-1), as the paper's Table 1.

VOC07 full + k = 1..16:  python eval_svm.py DIR --pretrained EXP/checkpoint_0199.pth.tar --low-shot
(DIR holds VOCdevkit/VOC2007; scripts/download_voc07.sh fetches it.)
"""

import sys

from pcl.config import build_svm_parser
from pcl.evaluation.svm import run_svm
from pcl.launch import main

if __name__ == "__main__":
    sys.exit(main(build_svm_parser, run_svm, one_process="eval_svm.py"))
