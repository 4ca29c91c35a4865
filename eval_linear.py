#!/usr/bin/env python
"""Linear probe on frozen features: the official protocol (default) or --cached-features (fast, not the paper's).

ImageNet, official hyper-parameters:  python eval_linear.py DIR --pretrained EXP/checkpoint_0199.pth.tar
Demo set:  python eval_linear.py -c configs/demo_linear.yaml --pretrained exp/demo/checkpoint_last.pth.tar
"""

import sys

from pcl.config import build_linear_parser
from pcl.evaluation.linear import fit_linear
from pcl.launch import main

if __name__ == "__main__":
    sys.exit(main(build_linear_parser, fit_linear))
