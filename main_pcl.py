#!/usr/bin/env python
"""PCL pretraining. Official flags work unchanged; e.g. the demo: python main_pcl.py -c configs/demo.yaml"""

import sys

from pcl import PCLError
from pcl.config import build_pretrain_parser, parse_args
from pcl.engine import launch


def main(argv=None) -> int:
    args = None
    try:
        args = parse_args(build_pretrain_parser(), argv)
        launch(args)
    except PCLError as e:
        if args is not None and args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
