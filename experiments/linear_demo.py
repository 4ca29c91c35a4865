#!/usr/bin/env python
"""Linear probe on the demo set: the official protocol vs --cached-features (center crops, and N cached views).

Trains the same linear head (configs/demo_linear.yaml: SGD lr 5, momentum 0.9, wd 0, lr /10 at 60%/80%) on a
pretrained demo checkpoint three ways and prints top-1 and wall time of each, with the speed-up of the cached
modes; writes JSON to --out. Run it alone on the machine (other CPU load distorts the times).

    python main_pcl.py -c configs/demo.yaml            # makes exp/demo/checkpoint_last.pth.tar
    python experiments/linear_demo.py --pretrained exp/demo/checkpoint_last.pth.tar
"""

import argparse
import os
import time

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import ROOT, cli, default_out, hardware, write_json
from pcl.config import build_linear_parser, parse_args
from pcl.evaluation.linear import fit_linear


def run(name: str, argv: list[str]) -> dict:
    args = parse_args(build_linear_parser(), argv)
    start = time.perf_counter()
    out = fit_linear(args)
    return {"name": name, "argv": argv, "seconds": round(time.perf_counter() - start, 1),
            "top1": round(out["top1"], 2), "best_top1": round(out["best_top1"], 2), "top5": round(out["top5"], 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default="exp/demo/checkpoint_last.pth.tar")
    p.add_argument("--views", type=int, default=10, help="augmented views per image for the second cached run")
    p.add_argument("--out", default=default_out("linear_demo.json"))
    p.add_argument("--exp-root", default="exp/bench_linear")
    p.add_argument("overrides", nargs="*", help="extra eval_linear flags, after --")
    opts = p.parse_args(argv)
    base = ["-c", os.path.join(ROOT, "configs", "demo_linear.yaml"), "--pretrained", opts.pretrained, "--no-progress",
            *opts.overrides]
    results = [run("official protocol", base + ["--exp-dir", f"{opts.exp_root}/full"]),
               run("cached, center crops", base + ["--cached-features", "--exp-dir", f"{opts.exp_root}/cached"]),
               run(f"cached, {opts.views} views", base + ["--cached-features", "--cached-views", str(opts.views),
                                                           "--exp-dir", f"{opts.exp_root}/cached_views"])]
    hw = hardware()
    print(f"\nlinear probe on the demo set ({hw}), {opts.pretrained}")
    print("| mode | top-1 (last) | best top-1 | top-5 | wall s | speed-up | gap to official |")
    print("|---|---|---|---|---|---|---|")
    ref = results[0]
    for r in results:
        r["speedup"] = round(ref["seconds"] / r["seconds"], 1)
        r["gap"] = round(r["top1"] - ref["top1"], 2)
        print(f"| {r['name']} | {r['top1']:.2f} | {r['best_top1']:.2f} | {r['top5']:.2f} | {r['seconds']:.1f} | "
              f"{r['speedup']}x | {r['gap']:+.2f} |")
    return write_json({"hardware": hw, "pretrained": opts.pretrained, "results": results}, opts.out)


if __name__ == "__main__":
    cli(main)
