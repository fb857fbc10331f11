"""CAMs and pseudo masks as a library (make_pseudo.py, eval_miou.py and train_seg.py use it): multi-scale
CAMs of the mask generator S, the CAM files (save_cams / load_cams), the background-threshold pseudo
mask, and the dense CRF (pydensecrf2) with docs/method.md's pseudo-mask parameters.
"""
import json

import numpy as np
import torch
import torch.nn.functional as F

from semples import runtime

# docs/method.md's dense CRF (the authors' release): pairwise terms and mean-field iterations.
CRF_DEFAULTS = dict(gauss_sxy=4, gauss_compat=3, bi_sxy=83, bi_srgb=5, bi_compat=3, iters=10)
CRF_GT_PROB = 0.7  # the unary's confidence in the label map of the pseudo mask


# ----------------------------------------------------------------------------------------------
# Dense CRF (make_pseudo.py's pseudo masks; train_seg.py's optional post-processing)
# ----------------------------------------------------------------------------------------------
def _crf_inference(image, unary, n_labels, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat, iters):
    import pydensecrf.densecrf as dcrf
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    rgb = np.array(image, order="C")  # a writable C-contiguous copy (pydensecrf refuses read-only buffers)
    d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=rgb, compat=bi_compat)
    return np.asarray(d.inference(iters), dtype=np.float32).reshape(n_labels, h, w)


def dense_crf(image, labels, n_labels=None, gt_prob=CRF_GT_PROB, **kw):
    """Refine a label map with a dense CRF (pydensecrf2), the pseudo-mask CRF of docs/method.md.

    image: uint8 [H, W, 3] RGB. labels: int [H, W] with values 0..n_labels-1 (every value is a real label,
    none means 'unsure'; the unary trusts it with gt_prob). Or labels = float class probabilities
    [n, H, W] (a segmenter's softmax: unary -log p, n_labels = n, gt_prob unused). kw: gauss_sxy,
    gauss_compat, bi_sxy, bi_srgb, bi_compat, iters (defaults CRF_DEFAULTS).
    Returns the refined labels, int64 [H, W] in 0..n_labels-1."""
    from pydensecrf.utils import unary_from_labels
    labels = np.asarray(labels)
    if labels.ndim == 3:
        return crf_probs(image, labels, **kw).argmax(0)
    if n_labels is None:
        raise ValueError("dense_crf on a label map needs n_labels")
    if labels.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"CRF labels {labels.shape} and image {np.asarray(image).shape[:2]} differ in size")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"CRF labels must lie in 0..{n_labels - 1}, got {labels.min()}..{labels.max()}")
    if n_labels < 2:
        return labels.astype(np.int64)
    unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    return _crf_inference(image, unary, n_labels, **{**CRF_DEFAULTS, **kw}).argmax(0)


def crf_probs(image, probs, **kw):
    """Dense CRF on class probabilities (e.g. a segmenter's softmax) [n, H, W] -> refined probabilities
    [n, H, W] float32; image uint8 [H, W, 3]; kw as dense_crf."""
    from pydensecrf.utils import unary_from_softmax
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[1:] != np.asarray(image).shape[:2]:
        raise ValueError(f"CRF probabilities {probs.shape[1:]} and image {np.asarray(image).shape[:2]} differ")
    return _crf_inference(image, unary_from_softmax(probs), probs.shape[0], **{**CRF_DEFAULTS, **kw})


# ----------------------------------------------------------------------------------------------
# CAM files
# ----------------------------------------------------------------------------------------------
def save_cams(path, cams, classes, size, meta=None):
    """One CAM file; `meta` (a JSON-able dict) records what made it, in the file itself (cam_meta reads it)."""
    with runtime.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, cams=cams.astype(np.float16), classes=np.asarray(classes, np.int16),
                            size=np.asarray(size, np.int32), meta=np.asarray(json.dumps(meta, sort_keys=True)))


def cam_meta(path):
    """(the meta dict stored by save_cams, None for a file without one; the 1-based classes as a list),
    without reading the CAMs themselves."""
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else None
            return meta, z["classes"].astype(np.int64).tolist()
    except Exception as e:
        raise ValueError(f"cannot read CAM file {path} ({e}); delete it and rerun make_pseudo.py") from e


def load_cams(path):
    """(cams float32 [C_present, H, W] at the image's size, classes int64 [C_present] 1-based)."""
    try:
        with np.load(path) as z:
            cams, classes, size = z["cams"], z["classes"].astype(np.int64), tuple(int(v) for v in z["size"])
    except FileNotFoundError:
        raise FileNotFoundError(f"CAM file {path} not found; run make_pseudo.py (without --masks_only) first")
    except Exception as e:
        raise ValueError(f"cannot read CAM file {path} ({e}); delete it and rerun make_pseudo.py") from e
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(f"CAM file {path}: cams {cams.shape} do not match classes {classes.tolist()}")
    cams = torch.from_numpy(cams.astype(np.float32))
    if cams.shape[1:] != size and len(classes):  # stored at --store_scale < 1
        cams = F.interpolate(cams[None], size, mode="bilinear", align_corners=False)[0]
    return cams.reshape(len(classes), *size).numpy(), classes


# ----------------------------------------------------------------------------------------------
# CAMs and pseudo masks
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def multiscale_cams(S, x, scales, size, device, amp, keep=None):
    """Sum over scales and flips of relu(S(x_s)) upsampled to x's size. x: uint8 [B, H, W, 3];
    keep: channel indices to upsample (default all). Returns float32 [B, len(keep), H, W] on device."""
    x = x.to(device).permute(0, 3, 1, 2).float() / 255
    B, _, H, W = x.shape
    total = 0
    # ---------------- algorithm logic ----------------
    for s in scales:
        f = s * size / max(H, W)
        hw = (max(1, round(H * f)), max(1, round(W * f)))
        xs = x if hw == (H, W) else F.interpolate(x, hw, mode="bilinear", align_corners=False, antialias=True)
        with runtime.autocast(device, amp):
            logits = S(torch.cat([xs, xs.flip(-1)]))
        m = torch.relu(logits.float())  # not sigmoid: it saturates at 1 and flattens the map
        if keep is not None:
            m = m[:, keep]
        m = F.interpolate(m, (H, W), mode="bilinear", align_corners=False)
        total = total + m[:B] + m[B:].flip(-1)  # the flipped half flipped back
    # --------------------------------------------------
    return total


def pseudo_mask(cams, classes, bg_threshold, image=None, crf=None):
    """cams [C, H, W] in [0, 1] of the present classes (1-based values `classes`) -> class-value map
    uint8 [H, W]. With `crf` (a dict: gt_prob and CRF_DEFAULTS' keys) and `image`, dense CRF on the labels."""
    # ---------------- algorithm logic ----------------
    bg = np.full((1,) + cams.shape[1:], bg_threshold, np.float64)  # float64 as metrics.sweep_confusion
    labels = np.concatenate([bg, cams]).argmax(0)  # the first maximum: a tie goes to the background
    if crf is not None and len(classes):
        labels = dense_crf(image, labels, len(classes) + 1, **crf)
    # --------------------------------------------------
    return np.concatenate([[0], classes]).astype(np.uint8)[labels]
