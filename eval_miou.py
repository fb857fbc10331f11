"""mIoU of class maps (pseudo masks, segmenter predictions) or of CAM seeds against the ground truth.

The standard WSSS evaluation (docs/method.md): one confusion matrix of (gt, pred) pixel pairs summed over
the whole split, gt 255 ignored; IoU_c = TP / (TP + FP + FN); mIoU = mean over classes, background
included (VOC 21 classes, COCO 81, toy K + 1). A class absent from both the ground truth and the
predictions of the whole split has no IoU (0 / 0): it is reported as n/a and left out of the mean,
as the standard VOC code does (nan + nanmean). Seeds and pseudo masks are scored on `train`, the
segmenter on `val`.

Class maps (PNG, palette or grey, values = class indices), e.g. pseudo masks:
    python eval_miou.py --dataset toy --pred out/toy/pseudo/masks
CAM seeds (the {id}.npz files of make_pseudo.py, or {id}.npy files in the format of the authors' release and
WeakTr: np.save of {0-based class index: H x W map}, see make_pseudo.py): sweeps the constant background
threshold and reports the best one, which is how seed mIoU is reported in WSSS papers. It is an evaluation on
ground truth: it selects nothing for the pipeline (make_pseudo.py's --bg_threshold is fixed a priori):
    python eval_miou.py --dataset voc --cams out/voc/pseudo/cams --t_start 0.30 --t_end 0.60
    python eval_miou.py --dataset voc --cams release/cams       # the release's / WeakTr's .npy CAMs
A .npy CAM file is a pickle, and loading one can run code that is in it: score only .npy files you trust.
On a dataset of your own, the sweep over a small labelled subset (a list of its ids with their masks) picks
a background threshold for the whole set: make_pseudo.py --bg_threshold T (run.sh: PSEUDO_ARGS).

Prints a per-class IoU table and ends with `mIoU: 63.21` (percent); with --cams also one line per
threshold and `best threshold: 0.xx` before it. --json PATH writes every figure, confusion included.
A missing prediction, a size mismatch or a value outside the class range is an error naming the file.

The metric itself is in semples/metrics.py (train_seg.py scores its predictions with it too).
"""
import json
import os
import sys

import numpy as np

from semples import datasets, presets, runtime
from semples.cams import cam_format
from semples.metrics import class_table, default_gt_dir, evaluate, miou_from_confusion, pixel_accuracy

PRESETS = presets.of("eval_miou")


def build_parser():
    p = runtime.new_parser(__doc__)
    p.add_argument("--data", type=str, default=None, help="dataset root in VOC layout (preset sets it)")
    p.add_argument("--workers", type=runtime.nonnegative_int, default=2, help="processes reading and scoring the files (0 = inline)")
    p.add_argument("--split", type=str, default="train",
                   help="image list scored (train for seeds and pseudo masks, val for the segmenter)")
    p.add_argument("--pred", type=str, default=None, help="folder of predicted class maps {id}.png")
    p.add_argument("--cams", type=str, default=None,
                   help="folder of CAM files, make_pseudo.py's {id}.npz or the release's / WeakTr's {id}.npy (only "
                        "load .npy files you trust): sweep the background threshold and report the best (the "
                        "standard way seed mIoU is reported; an evaluation on ground truth, it selects nothing for "
                        "the pipeline)")
    p.add_argument("--cam_format", type=str, default=None, choices=("npz", "npy"),
                   help="which CAM files of --cams to read where it holds both (default: whichever it holds for "
                        "every image)")
    p.add_argument("--t_start", type=runtime.unit_float, default=0.05, help="first background threshold of the sweep")
    p.add_argument("--t_end", type=runtime.unit_float, default=0.95, help="last background threshold (included)")
    p.add_argument("--t_step", type=runtime.positive_float, default=0.01, help="threshold step")
    p.add_argument("--chunk", type=runtime.positive_int, default=32, help="images per worker task")
    p.add_argument("--json", type=str, default=None, help="write all figures to this JSON file")
    return p


def main(args):
    if (args.pred is None) == (args.cams is None):
        raise ValueError("pass exactly one of --pred DIR (class maps) and --cams DIR (CAM files)")
    if args.cams and args.t_start > args.t_end:
        raise ValueError(f"--t_start {args.t_start} is above --t_end {args.t_end}: the sweep would be empty")
    if args.json:
        runtime.make_dir(os.path.dirname(os.path.abspath(args.json)), "--json")
    names = ["background"] + datasets.read_class_names(args.data, args.dataset)
    C = len(names)
    ids = datasets.read_ids(args.data, args.split)
    gt_dir = default_gt_dir(args.data, ids)  # DATA/SegmentationClass if it holds the split, else ...Aug
    folder = args.pred or args.cams
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{'--pred' if args.pred else '--cams'} folder {folder} not found")
    ext = "png" if args.pred else cam_format(folder, ids, args.cam_format, "--cams", f" (split '{args.split}')")
    missing = [i for i in ids if not os.path.exists(os.path.join(folder, f"{i}.{ext}"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(ids)} predictions of split '{args.split}' are missing "
                                f"in {folder}, e.g. {os.path.join(folder, missing[0] + '.' + ext)}")
    pairs = [(os.path.join(gt_dir, f"{i}.png"), os.path.join(folder, f"{i}.{ext}")) for i in ids]
    print(f"evaluating {len(ids)} images of '{args.split}' ({C} classes) against {gt_dir}")
    out = {"split": args.split, "num_images": len(ids), "class_names": names, "gt_dir": gt_dir}
    if args.pred:
        conf = evaluate(pairs, C, "pred", workers=args.workers, chunk=args.chunk)
        out["pred"] = args.pred
    else:
        n = int(np.floor((args.t_end - args.t_start) / args.t_step + 1e-6)) + 1
        decimals = max(2, int(np.ceil(-np.log10(args.t_step) - 1e-9)))
        thresholds = np.round(args.t_start + args.t_step * np.arange(n), decimals)
        confs = evaluate(pairs, C, "cams", thresholds, args.workers, args.chunk)
        mious = [miou_from_confusion(c)[0] for c in confs]
        best = int(np.nanargmax(mious))
        if n > 1 and best in (0, n - 1):
            print(f"warning: the best threshold {thresholds[best]} is at the edge of the sweep "
                  f"{args.t_start}..{args.t_end}; widen it (--t_start/--t_end)", file=sys.stderr)
        print(f"{'threshold':>9} {'mIoU':>7}")
        for t, m in zip(thresholds, mious):
            print(f"{t:>9.{decimals}f} {100 * m:>7.2f}")
        conf = confs[best]
        out.update(cams=args.cams, thresholds=thresholds.tolist(), miou_per_threshold=[100 * m for m in mious],
                   best_threshold=float(thresholds[best]))
    miou, iou = miou_from_confusion(conf)
    acc = pixel_accuracy(conf)
    print(class_table(names, iou, acc))
    out.update(iou={n: (None if np.isnan(v) else 100 * v) for n, v in zip(names, iou)},
               miou=100 * miou, pixel_acc=100 * acc, confusion=conf.tolist())
    if args.json:
        with runtime.atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(out, f, indent=1)
    if args.cams:
        print(f"best threshold: {out['best_threshold']:.{decimals}f}")
    print(f"mIoU: {100 * miou:.2f}")
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
