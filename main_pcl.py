#!/usr/bin/env python
"""PCL pretraining. Official flags work unchanged; e.g. the demo: python main_pcl.py -c configs/demo.yaml"""

import sys

from pcl.config import build_pretrain_parser
from pcl.engine import fit
from pcl.launch import main

if __name__ == "__main__":
    sys.exit(main(build_pretrain_parser, fit))
