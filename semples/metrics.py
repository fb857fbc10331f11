"""The mIoU metric as a library (eval_miou.py and train_seg.py use it): the confusion matrix of (gt, pred)
pixel pairs (gt 255 ignored), mIoU and pixel accuracy from it, the one-pass background-threshold sweep
over CAM files, and the scoring of whole folders in worker processes.

confusion_matrix(gt, pred, num_classes) -> [C, C]; miou_from_confusion(conf) -> (mIoU, per-class IoU),
fractions; pixel_accuracy(conf); sweep_confusion(gt, cams, classes, thresholds, C) -> [T, C, C];
evaluate(pairs, C, kind) sums them over (gt path, prediction path) pairs.
"""
import multiprocessing as mp
import os

import numpy as np

from semples import datasets, runtime
from semples.cams import load_cams

IGNORE = 255


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
        gt = datasets.read_mask(gt_path)
        where = f"{pred_path} (ground truth {gt_path})"
        if kind == "pred":
            total = total + confusion_matrix(gt, datasets.read_mask(pred_path), num_classes, where)
        else:
            cams, classes = load_cams(pred_path, gt.shape)
            total = total + sweep_confusion(gt, cams, classes, thresholds, num_classes, where)
    return total


def evaluate(pairs, num_classes, kind="pred", thresholds=None, workers=0, chunk=32):
    """Summed confusion over (gt path, prediction path) pairs: [C, C], or [T, C, C] for kind 'cams'."""
    jobs = [(kind, pairs[i:i + chunk], num_classes, thresholds) for i in range(0, len(pairs), chunk)]
    shape = (num_classes, num_classes) if kind == "pred" else (len(thresholds), num_classes, num_classes)
    total = np.zeros(shape, np.int64)
    if workers > 0 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for conf in runtime.progress(pool.imap_unordered(_chunk_task, jobs), "eval", total=len(jobs)):
                total += conf
    else:
        for job in runtime.progress(jobs, "eval"):
            total += _chunk_task(job)
    return total


def default_gt_dir(root, ids):
    """The ground truth scored against: DATA/SegmentationClass if it holds every image of `ids` (the
    standard evaluation), else the train_aug masks (datasets.mask_dir)."""
    own = os.path.join(root, "SegmentationClass")
    if all(os.path.exists(os.path.join(own, f"{i}.png")) for i in ids):
        return own
    return datasets.mask_dir(root)


def class_table(names, iou, acc):
    lines = [f"{'class':<16} {'IoU':>7}"]
    for name, v in zip(names, iou):
        lines.append(f"{name:<16} {'n/a' if np.isnan(v) else f'{100 * v:.2f}':>7}")
    lines.append(f"{'pixel accuracy':<16} {100 * acc:>7.2f}")
    return "\n".join(lines)
