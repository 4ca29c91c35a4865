#!/usr/bin/env python
"""PCL pretraining. Official flags work unchanged; e.g. the demo: python main_pcl.py -c configs/demo.yaml"""

import sys

from pcl.config import build_pretrain_parser, run_cli
from pcl.engine import launch

if __name__ == "__main__":
    sys.exit(run_cli(build_pretrain_parser, launch))
