"""mIoU of class maps (pseudo masks, segmenter predictions) or of CAM seeds against the ground truth.

The standard WSSS evaluation (METHOD.md): one confusion matrix of (gt, pred) pixel pairs summed over
the whole split, gt 255 ignored; IoU_c = TP / (TP + FP + FN); mIoU = mean over classes, background
included (VOC 21 classes, COCO 81, toy K + 1). A class absent from both the ground truth and the
predictions of the whole split has no IoU (0 / 0): it is reported as n/a and left out of the mean,
as the standard VOC code does (nan + nanmean). Seeds and pseudo masks are scored on `train`, the
segmenter on `val`.

Class maps (PNG, palette or grey, values = class indices), e.g. pseudo masks:
    python eval_miou.py --dataset toy --pred out/toy/pseudo/masks
CAM seeds (the npz files of make_pseudo.py): sweeps the constant background threshold and reports the
best one, which is how seed mIoU is reported in WSSS papers. It is an evaluation on ground truth: it
selects nothing for the pipeline (make_pseudo.py's --bg_threshold is fixed a priori):
    python eval_miou.py --dataset voc --cams out/voc/pseudo/cams --t_start 0.30 --t_end 0.60

Prints a per-class IoU table and ends with `mIoU: 63.21` (percent); with --cams also one line per
threshold and `best threshold: 0.xx` before it. --json PATH writes every figure, confusion included.
A missing prediction, a size mismatch or a value outside the class range is an error naming the file.

Library use (train_seg.py): confusion_matrix(gt, pred, num_classes) -> [C, C];
miou_from_confusion(conf) -> (mIoU, per-class IoU), fractions; pixel_accuracy(conf).
"""
import argparse
import json
import multiprocessing as mp
import os
import sys

import numpy as np

import common

PRESETS = common.presets()
IGNORE = 255


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(p)  # one flag set serves every script; --device, --seed, --amp are unused here
    p._option_string_actions["--workers"].help = "processes reading and scoring the files (0 = inline)"
    p.add_argument("--split", type=str, default="train",
                   help="image list scored (train for seeds and pseudo masks, val for the segmenter)")
    p.add_argument("--gt_dir", type=str, default=None,
                   help="ground-truth PNGs (default DATA/SegmentationClass if it holds every image of the "
                        "split, as the standard evaluation, else DATA/SegmentationClassAug)")
    p.add_argument("--pred", type=str, default=None, help="folder of predicted class maps {id}.png")
    p.add_argument("--cams", type=str, default=None,
                   help="folder of make_pseudo.py CAM files {id}.npz: sweep the background threshold and report "
                        "the best (the standard way seed mIoU is reported; an evaluation on ground truth, it "
                        "selects nothing for the pipeline)")
    p.add_argument("--t_start", type=float, default=0.30, help="first background threshold of the sweep")
    p.add_argument("--t_end", type=float, default=0.60, help="last background threshold (included)")
    p.add_argument("--t_step", type=float, default=0.01, help="threshold step")
    p.add_argument("--chunk", type=int, default=32, help="images per worker task")
    p.add_argument("--json", type=str, default=None, help="write all figures to this JSON file")
    return p


# ----------------------------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------------------------
def _check(gt, pred, num_classes, where):
    gt, pred = np.asarray(gt), np.asarray(pred)
    for name, a in (("ground truth", gt), ("prediction", pred)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where}: {name} has dtype {a.dtype}; expected integer class indices")
    if gt.shape != pred.shape:
        raise ValueError(f"{where}: prediction has size {pred.shape}, ground truth {gt.shape}")
    valid = gt != IGNORE
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    for name, values in (("ground truth", g), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)]
            extra = f" (and not {IGNORE})" if name == "ground truth" else ""
            raise ValueError(f"{where}: {name} holds value {int(bad[0])}, outside 0..{num_classes - 1}{extra}")
    return g, p


def confusion_matrix(gt, pred, num_classes, where="prediction"):
    """int64 [C, C] counts of (gt row, pred column) pixel pairs; gt 255 is ignored. gt and pred: integer
    arrays (numpy or torch) of one shape. A size mismatch or a value outside 0..C-1 raises ValueError
    mentioning `where` (pass the file name)."""
    if hasattr(gt, "cpu"):
        gt = gt.cpu().numpy()
    if hasattr(pred, "cpu"):
        pred = pred.cpu().numpy()
    g, p = _check(gt, pred, num_classes, where)
    return np.bincount(g * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def miou_from_confusion(conf):
    """(mIoU, per-class IoU [C]) of a confusion matrix (rows gt, columns pred), as fractions in [0, 1].
    A class absent from both gt and pred (TP + FP + FN = 0) has IoU nan and is left out of the mean
    (the standard VOC code's nanmean); mIoU is nan only if the matrix is empty."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp  # TP + FP + FN
    present = denom > 0
    iou = np.full(len(tp), np.nan)
    iou[present] = tp[present] / denom[present]
    return (float(iou[present].mean()) if present.any() else float("nan")), iou


def pixel_accuracy(conf):
    """Correctly labelled pixels / all counted pixels (fraction)."""
    conf = np.asarray(conf, dtype=np.float64)
    return float(np.trace(conf) / conf.sum()) if conf.sum() else float("nan")


def sweep_confusion(gt, cams, classes, thresholds, num_classes, where="cams"):
    """Confusion matrices [T, C, C] of the seeds argmax([t, cams]) for every threshold t in one pass:
    a pixel goes to its best class when that class's CAM exceeds t (strictly; a tie is background),
    else to the background. cams [C_present, H, W]; classes their 1-based values."""
    gt = np.asarray(gt)
    if gt.shape != cams.shape[1:]:
        raise ValueError(f"{where}: CAMs have size {cams.shape[1:]}, ground truth {gt.shape}")
    if len(classes) and (min(classes) < 1 or max(classes) >= num_classes):
        raise ValueError(f"{where}: CAM classes {list(classes)} outside 1..{num_classes - 1}")
    T, C = len(thresholds), num_classes
    if len(classes):
        best, top = cams.argmax(0), cams.max(0)
        cls = np.asarray(classes, np.int64)[best]
    else:
        top, cls = np.full(gt.shape, -np.inf), np.zeros(gt.shape, np.int64)
    g, c = _check(gt, cls, C, where)
    valid = gt != IGNORE
    bucket = np.searchsorted(np.asarray(thresholds, np.float64), top[valid].astype(np.float64), side="left")
    # bucket b = number of thresholds below the pixel's top score: foreground for thresholds 0..b-1
    A = np.bincount((bucket * C + g) * C + c, minlength=(T + 1) * C * C).reshape(T + 1, C, C)
    fg = np.cumsum(A[::-1], axis=0)[::-1][1:]  # fg[i] = sum over b > i
    bg = np.cumsum(A.sum(2), axis=0)[:T]  # per gt class, pixels with b <= i
    conf = fg.copy()
    conf[:, :, 0] += bg
    return conf


# ----------------------------------------------------------------------------------------------
# Files, in worker processes
# ----------------------------------------------------------------------------------------------
def _chunk_task(job):
    """Sum of the confusion matrices of a list of (gt path, prediction path) pairs."""
    kind, pairs, num_classes, thresholds = job
    total = 0
    for gt_path, pred_path in pairs:
        if not os.path.exists(pred_path):
            raise FileNotFoundError(f"prediction {pred_path} is missing (ground truth {gt_path})")
        gt = common.read_mask(gt_path)
        where = f"{pred_path} (ground truth {gt_path})"
        if kind == "pred":
            total = total + confusion_matrix(gt, common.read_mask(pred_path), num_classes, where)
        else:
            from make_pseudo import load_cams
            cams, classes = load_cams(pred_path)
            total = total + sweep_confusion(gt, cams, classes, thresholds, num_classes, where)
    return total


def evaluate(pairs, num_classes, kind="pred", thresholds=None, workers=0, chunk=32):
    """Summed confusion over (gt path, prediction path) pairs: [C, C], or [T, C, C] for kind 'cams'."""
    jobs = [(kind, pairs[i:i + chunk], num_classes, thresholds) for i in range(0, len(pairs), chunk)]
    shape = (num_classes, num_classes) if kind == "pred" else (len(thresholds), num_classes, num_classes)
    total = np.zeros(shape, np.int64)
    if workers > 0 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for conf in common.progress(pool.imap_unordered(_chunk_task, jobs), "eval", total=len(jobs)):
                total += conf
    else:
        for job in common.progress(jobs, "eval"):
            total += _chunk_task(job)
    return total


def default_gt_dir(root, ids):
    own = os.path.join(root, "SegmentationClass")
    if all(os.path.exists(os.path.join(own, f"{i}.png")) for i in ids):
        return own
    return common.mask_dir(root)


def class_table(names, iou, acc):
    lines = [f"{'class':<16} {'IoU':>7}"]
    for name, v in zip(names, iou):
        lines.append(f"{name:<16} {'n/a' if np.isnan(v) else f'{100 * v:.2f}':>7}")
    lines.append(f"{'pixel accuracy':<16} {100 * acc:>7.2f}")
    return "\n".join(lines)


def main(args):
    if (args.pred is None) == (args.cams is None):
        raise ValueError("pass exactly one of --pred DIR (class maps) and --cams DIR (CAM files)")
    names = ["background"] + common.read_class_names(args.data, args.dataset)
    C = len(names)
    ids = common.read_ids(args.data, args.split)
    gt_dir = args.gt_dir or default_gt_dir(args.data, ids)
    folder, ext = (args.pred, "png") if args.pred else (args.cams, "npz")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{'--pred' if args.pred else '--cams'} folder {folder} not found")
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
        if n < 1 or args.t_step <= 0:
            raise ValueError(f"empty threshold sweep {args.t_start}..{args.t_end} step {args.t_step}")
        decimals = max(2, int(np.ceil(-np.log10(args.t_step) - 1e-9)))
        thresholds = np.round(args.t_start + args.t_step * np.arange(n), decimals)
        confs = evaluate(pairs, C, "cams", thresholds, args.workers, args.chunk)
        mious = [miou_from_confusion(c)[0] for c in confs]
        best = int(np.nanargmax(mious))
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
        with common.atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(out, f, indent=1)
    if args.cams:
        print(f"best threshold: {out['best_threshold']:.{decimals}f}")
    print(f"mIoU: {100 * miou:.2f}")
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main(common.parse_args(build_parser(), PRESETS))
