"""CAMs and pseudo masks as a library (make_pseudo.py, eval_miou.py and train_seg.py use it): multi-scale
CAMs of the mask generator S, the CAM files (save_cams / load_cams: ours, {id}.npz, and the authors' release /
WeakTr's, {id}.npy), the background-threshold pseudo mask, and the dense CRF (pydensecrf2) with
docs/method.md's pseudo-mask parameters.
"""
import json
import os

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
# CAM files: ours ({id}.npz) and the authors' release / WeakTr's ({id}.npy)
# ----------------------------------------------------------------------------------------------
CAM_FORMATS = ("npz", "npy")
# The meta of a folder of .npy CAM files that make_pseudo.py wrote (the release format has no room for it):
# a file beside them, written before the first of them (write_npy_meta).
NPY_META = "cam_meta.json"


def save_cams(path, cams, classes, size, meta=None):
    """One CAM file, its format by the path's extension. {id}.npz, ours: np.savez_compressed of `cams` float16
    [C_present, h, w], `classes` (1-based), `size` [H, W] and `meta` (a JSON-able dict recording what made it,
    cam_meta reads it). {id}.npy, the release's: save_release_cams (cams at full size; `meta` goes to the
    folder's NPY_META file, write_npy_meta)."""
    if str(path).endswith(".npy"):
        return save_release_cams(path, cams, classes, size)
    with runtime.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, cams=cams.astype(np.float16), classes=np.asarray(classes, np.int16),
                            size=np.asarray(size, np.int32), meta=np.asarray(json.dumps(meta, sort_keys=True)))


def save_release_cams(path, cams, classes, size):
    """A CAM file of the authors' release / WeakTr: `np.save(path, cam_dict)` with cam_dict = {k: H x W float32
    map} for each labelled class, k its 0-based foreground index (class value k + 1), at the image's full size."""
    cams = np.asarray(cams)
    if cams.shape[1:] != tuple(size):
        raise ValueError(f"{path}: the release's .npy format holds CAMs at the image's size {tuple(size)}, got "
                         f"{cams.shape[1:]} (pass --store_scale 1)")
    cam_dict = {int(c) - 1: np.asarray(m, np.float32) for c, m in zip(classes, cams)}
    with runtime.atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save adds no extension
        np.save(f, cam_dict)


def load_release_cams(path):
    """(cams float32 [C_present, H, W], classes int64 1-based, ascending) of a release / WeakTr CAM file:
    `np.load(path, allow_pickle=True).item()` = {0-based class index: H x W map}, the maps of the labelled
    classes min-max normalised at the image's full size (WeakTr's evaluation stacks them under a constant
    background plane: tensor[k + 1] = cam_dict[k], tensor[0] = the threshold, as pseudo_mask does).

    The file is a pickle: loading it can run code that is in it. Load only files you trust (your own, or a
    release you downloaded from its authors). A file that is not such a dict (not a dict; a key that is not a
    non-negative integer; a map that is not 2-D or not of one size with the others) is refused, naming it."""
    try:
        obj = np.load(path, allow_pickle=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"CAM file {path} not found") from None
    except Exception as e:
        raise ValueError(f"cannot read CAM file {path} ({e})") from e
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        what = f"an array {obj.dtype} {obj.shape}" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise ValueError(f"CAM file {path} holds {what}, not the release's dict {{0-based class index: H x W CAM}} "
                         "(np.save(path, cam_dict))")
    keys = sorted(obj, key=repr)
    bad = [k for k in keys if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 0]
    if bad:
        raise ValueError(f"CAM file {path}: key {bad[0]!r} is not a 0-based foreground class index (keys must be "
                         "integers 0..K-1: class value k + 1)")
    keys = sorted(int(k) for k in keys)
    maps = [np.asarray(obj[k]) for k in keys]
    for k, m in zip(keys, maps):
        if m.ndim != 2 or not np.issubdtype(m.dtype, np.number) or m.shape != maps[0].shape:
            raise ValueError(f"CAM file {path}: the map of class index {k} is {m.dtype} {m.shape}; every map must "
                             f"be a 2-D numeric H x W array of one size{f' ({maps[0].shape})' if k != keys[0] else ''}")
    cams = np.stack(maps).astype(np.float32) if maps else np.zeros((0, 0, 0), np.float32)
    return cams, np.asarray(keys, np.int64) + 1


def write_npy_meta(folder, meta):
    """Record `meta` (what makes the CAMs) for the .npy CAM files of `folder`, before writing the first one."""
    with runtime.atomic_path(os.path.join(folder, NPY_META)) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def read_npy_meta(folder):
    """The meta make_pseudo.py recorded for the .npy CAM files of `folder`, or None (a release's folder)."""
    path = os.path.join(folder, NPY_META)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and the .npy CAM files beside it, and rerun "
                         "make_pseudo.py") from None


def cam_meta(path):
    """(the meta dict stored by save_cams, None for a file without one; the 1-based classes as a list),
    without reading the CAMs themselves (but a .npy file is read whole: its meta is its folder's NPY_META)."""
    if str(path).endswith(".npy"):
        return read_npy_meta(os.path.dirname(path)), load_release_cams(path)[1].tolist()
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else None
            return meta, z["classes"].astype(np.int64).tolist()
    except Exception as e:
        raise ValueError(f"cannot read CAM file {path} ({e}); delete it and rerun make_pseudo.py") from e


def load_cams(path, size=None):
    """(cams float32 [C_present, H, W] at the image's size, classes int64 [C_present] 1-based) of a CAM
    file, ours ({id}.npz) or the release's ({id}.npy, load_release_cams: only load files you trust).
    `size` (H, W), when given, is the image's: a file of another size is refused naming it (and a .npy file
    that holds no class gets that size)."""
    if str(path).endswith(".npy"):
        cams, classes = load_release_cams(path)
        if size is not None and not len(classes):
            cams = np.zeros((0, *size), np.float32)
        if size is not None and cams.shape[1:] != tuple(size):
            raise ValueError(f"CAM file {path} holds CAMs of size {cams.shape[1:]}, its image is {tuple(size)}")
        if not len(classes) and size is None:
            raise ValueError(f"CAM file {path} holds no class (an empty dict), so the size of its image is unknown")
        return cams, classes
    try:
        with np.load(path) as z:
            cams, classes, stored = z["cams"], z["classes"].astype(np.int64), tuple(int(v) for v in z["size"])
    except FileNotFoundError:
        raise FileNotFoundError(f"CAM file {path} not found; run make_pseudo.py (without --masks_only) first")
    except Exception as e:
        raise ValueError(f"cannot read CAM file {path} ({e}); delete it and rerun make_pseudo.py") from e
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(f"CAM file {path}: cams {cams.shape} do not match classes {classes.tolist()}")
    if size is not None and stored != tuple(size):
        raise ValueError(f"CAM file {path} holds CAMs of size {stored}, its image is {tuple(size)}")
    cams = torch.from_numpy(cams.astype(np.float32))
    if cams.shape[1:] != stored and len(classes):  # stored at --store_scale < 1
        cams = F.interpolate(cams[None], stored, mode="bilinear", align_corners=False)[0]
    return cams.reshape(len(classes), *stored).numpy(), classes


def cam_format(folder, ids, fmt=None, flag="--cams", hint=""):
    """The format of the CAM files of `ids` in `folder`: `fmt` ('npz' or 'npy') if given, else whichever of
    {id}.npz and {id}.npy every id has. Missing files raise FileNotFoundError naming one (then `hint`); a
    folder complete in both formats is refused unless `fmt` says which."""
    fmts = [fmt] if fmt else CAM_FORMATS
    missing = {f: [i for i in ids if not os.path.exists(os.path.join(folder, f"{i}.{f}"))] for f in fmts}
    complete = [f for f in fmts if not missing[f]]
    if len(complete) == 1:
        return complete[0]
    if complete:
        raise ValueError(f"{flag} {folder} holds both .npz and .npy CAM files of every image; say which to read "
                         "(--cam_format npz or npy)")
    f = min(fmts, key=lambda f: len(missing[f]))
    example = os.path.join(folder, f"{missing[f][0]}.{f}")
    kinds = "" if fmt else " (.npz, ours, or .npy, the release's)"
    raise FileNotFoundError(f"{len(missing[f])} of {len(ids)} CAM files{kinds} are missing in {flag} {folder}, "
                            f"e.g. {example}{hint}")


# ----------------------------------------------------------------------------------------------
# CAMs and pseudo masks
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def multiscale_cams(S, x, scales, size, device, amp, keep=None):
    """Sum over scales and flips of relu(S(x_s)) upsampled to x's size; x_s is x with its longer side resized
    to s * size, or with size None (a DeiT S, as WeakTr) x resized by s. x: uint8 [B, H, W, 3];
    keep: channel indices to upsample (default all). Returns float32 [B, len(keep), H, W] on device."""
    x = x.to(device).permute(0, 3, 1, 2).float() / 255
    B, _, H, W = x.shape
    total = 0
    # ---------------- algorithm logic ----------------
    for s in scales:
        f = s if size is None else s * size / max(H, W)
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


MASS = "mass"  # --bg_threshold mass: each class's threshold from its own CAM (mass_thresholds)


def mass_thresholds(cams):
    """Per class, the threshold that keeps the CAM's mass: the value above which lies the share mean(M_k) of the
    pixels, so the hard mask has the area of the soft mask M_k (min-max normalised, in [0, 1]) that stages (a)
    and (c) train through CLIP. A stage that makes the CAM more compact moves its threshold with it, where a
    constant one cuts into the object (docs/toy.md, "Threshold"). cams [C, H, W] -> [C]."""
    flat = cams.reshape(len(cams), int(np.prod(cams.shape[1:]))).astype(np.float64)  # an image with no class: [0, H*W]
    return np.array([np.quantile(m, 1 - m.mean()) for m in flat])


def pseudo_mask(cams, classes, bg_threshold, image=None, crf=None):
    """cams [C, H, W] in [0, 1] of the present classes (1-based values `classes`) -> class-value map
    uint8 [H, W]. bg_threshold: the constant background score, or MASS (each class at its mass_thresholds,
    where two classes claim a pixel the one further above its own threshold wins). With `crf` (a dict: gt_prob
    and CRF_DEFAULTS' keys) and `image`, dense CRF on the labels."""
    # ---------------- algorithm logic ----------------
    if bg_threshold == MASS:  # each map remapped (monotone, piecewise linear) so that its threshold lands on 0.5
        t = mass_thresholds(cams)[:, None, None]
        cams = np.where(cams >= t, 0.5 + 0.5 * (cams - t) / np.maximum(1 - t, 1e-6), 0.5 * cams / np.maximum(t, 1e-6))
        bg_threshold = 0.5
    bg = np.full((1,) + cams.shape[1:], bg_threshold, np.float64)  # float64 as metrics.sweep_confusion
    labels = np.concatenate([bg, cams]).argmax(0)  # the first maximum: a tie goes to the background
    if crf is not None and len(classes):
        labels = dense_crf(image, labels, len(classes) + 1, **crf)
    # --------------------------------------------------
    return np.concatenate([[0], classes]).astype(np.uint8)[labels]
