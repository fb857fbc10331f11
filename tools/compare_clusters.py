"""Category clusters, measured: the CAM network trained without and with --clusters, and the full SemPLeS
pipeline on top of each, over pipeline seeds; each cell a mean +- std of seed mIoU (best threshold of a
sweep) and pseudo-mask mIoU (the preset threshold) on the train list.

Toy world (2-core CPU, about 35 minutes for 3 seeds; data/toy is made first if absent):
    python tools/compare_clusters.py --dataset toy --seeds 0 1 2 --out out/toy_clusters
The plain pipeline alone over seeds (tools/seeds.py adds the control and more worlds):
    python tools/compare_clusters.py --dataset toy --seeds 0 1 2 --arms without --out out/toy_seeds
VOC (the cluster file defaults to semples/clusters/voc.json; flags for run.sh go through --run_args):
    python tools/compare_clusters.py --dataset voc --run_args "--init data/resnet50-imagenet.pth --gpus 4"

For each seed it runs `bash run.sh --no-seg --seed S --out OUT/{without,with}/seedS [--clusters FILE]` (the
segmenter is not trained: the comparison is about the CAMs; run.sh skips finished steps, so a rerun only
prints), reads each run's results.json, writes OUT/clusters.json (every run and each cell's mean and std)
and prints the table.
"""
import json
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
from semples import datasets, presets, runtime

ROWS = {"cam": "CAM network", "a": "stage (a) only: L_match", "c": "SemPLeS (a)+(b)+(c)"}
ARMS = ("without", "with")


def build_parser():
    p = runtime.new_parser(__doc__)
    p.add_argument("--data", type=str, default=None, help="dataset root (preset sets it)")
    p.add_argument("--clip", type=str, default=None, help="CLIP name or file (preset sets it)")
    p.add_argument("--clusters", type=str, default=None,
                   help="cluster file of the 'with' arm (default: DATA/clusters.json for toy, clusters/DATASET.json)")
    p.add_argument("--out", type=str, default=None, help="output folder")
    p.add_argument("--seeds", type=runtime.nonnegative_int, nargs="+", default=[0, 1, 2], help="pipeline seeds")
    p.add_argument("--run_args", type=str, default="", help="extra flags for run.sh (e.g. --init FILE --gpus 4)")
    p.add_argument("--arms", type=str, nargs="+", choices=ARMS, default=list(ARMS),
                   help="which CAM networks: 'without' alone measures the plain pipeline over seeds")
    return p


PRESETS = presets.of("compare_clusters")


def pipeline(args, arm, seed, log):
    """One run.sh pipeline (without the segmenter); returns its results.json."""
    out = os.path.join(args.out, arm, f"seed{seed}")
    cmd = ["bash", os.path.join(runtime.REPO, "run.sh"), f"--{args.dataset}", args.data, "--clip", args.clip,
           "--seed", str(seed), "--out", out, "--no-seg", *shlex.split(args.run_args)]
    if arm == "with":
        cmd += ["--clusters", args.clusters]
    log(" ".join(cmd))
    runtime.run_command(cmd, env={**os.environ, "PYTHON": sys.executable})
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def main(args):
    args.clip = args.clip or presets.DATASETS[args.dataset]["clip"]
    args.clusters = args.clusters or (os.path.join(args.data, "clusters.json") if args.dataset == "toy"
                                      else os.path.join(runtime.REPO, "semples", "clusters", f"{args.dataset}.json"))
    clustered = "with" in args.arms
    # the toy's cluster file is written by run.sh's make_toy step
    if clustered and (args.dataset != "toy" or os.path.exists(args.clusters)):
        datasets.read_clusters(args.clusters, datasets.read_class_names(args.data, args.dataset))
    log = runtime.Logger(args.out)
    runtime.save_args(args, args.out)
    runs = {arm: {s: pipeline(args, arm, s, log) for s in args.seeds} for arm in args.arms}
    cells = {arm: {row: {metric: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
                         for metric in ("seed_miou", "pseudo_miou")
                         for v in [[runs[arm][s][row][metric] for s in args.seeds]]}
                   for row in ROWS} for arm in args.arms}
    report = {"dataset": args.dataset, "seeds": args.seeds, "clusters": args.clusters, "cells": cells, "runs": runs,
              "metric": "mIoU %, train list; seeds at the best threshold of a 0.05-0.95 sweep, pseudo masks at the "
                        "preset threshold"}
    with runtime.atomic_path(os.path.join(args.out, "clusters.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    title = ("Category clusters" if clustered else "SemPLeS over pipeline seeds") + f" on {args.dataset}"
    log(f"\n{title} (mIoU %, train list, mean +- std over seeds {args.seeds}"
        + (f"; 'with': train_cam.py --clusters {args.clusters})" if clustered else ")"))
    log(f"{'':26s}" + "".join(f"{m + ', ' + arm:>17s}" for m in ("seed", "pseudo") for arm in args.arms))
    for row, name in ROWS.items():
        c = [cells[arm][row][m] for m in ("seed_miou", "pseudo_miou") for arm in args.arms]
        log(f"{name:26s} " + " ".join(f"{x['mean']:8.2f} +- {x['std']:4.2f}" for x in c))
    log(f"written: {os.path.join(args.out, 'clusters.json')}")


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
