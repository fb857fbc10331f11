"""Pseudo masks from the refined mask generator S: multi-scale CAMs -> constant background plane ->
argmax -> dense CRF -> VOC-palette PNGs, the training targets of the segmenter (train_seg.py).

CAM of image X (METHOD.md, as the authors' release): for each scale s, X resized so that its longer
side is s * --size (aspect kept; --size defaults to the square size S was trained at), plus its
horizontal flip; relu(S(.)) (the CAM, as CLIMS/IRN make it) upsampled bilinearly to X's size; summed
over scales and flips; kept for X's labelled classes only; min-max normalised per class. Pseudo mask: argmax over
[--bg_threshold plane, present classes] (a tie goes to the background), then dense CRF (unary from
those labels with gt_prob 0.7; Gaussian sxy 4 compat 3; bilateral sxy 83 srgb 5 compat 3; 10 iters).
The threshold defaults are fixed (VOC 0.43 as in the release, COCO 0.42, toy 0.60 from a one-time
developers' sweep on toy train): the pipeline never looks at ground truth. `eval_miou.py --cams
OUT/cams` sweeps the threshold on train-set GT, which is how seeds are *reported*, not how the threshold is chosen here.

Toy world (CPU):
    python make_pseudo.py --dataset toy --device cpu
    python eval_miou.py --dataset toy --cams out/toy/pseudo/cams        # seed mIoU (threshold sweep)
    python eval_miou.py --dataset toy --pred out/toy/pseudo/masks       # pseudo-mask mIoU
VOC (one GPU; CRF in 16 processes):
    python make_pseudo.py --dataset voc --workers 16
Another background threshold, reusing the saved CAMs (no GPU needed):
    python make_pseudo.py --dataset voc --masks_only --bg_threshold 0.45 --mask_dir out/voc/pseudo/masks_045

Writes OUT/cams/{id}.npz (keys: `cams` float16 [C_present, h, w], min-max normalised; `classes` the
C_present 1-based class values; `size` the image's [H, W]; h, w = H, W times --store_scale),
OUT/cams/meta.json (what made them), OUT/masks/{id}.png (VOC palette; --mask_dir),
OUT/masks/params.json, OUT/vis/{id}.jpg (--vis N: image | CAM heatmap | pseudo mask), OUT/log.txt,
OUT/args.json (args_masks.json for --masks_only). Both phases resume: existing CAM files are kept
(they must come from the same checkpoint and settings, else an error), existing masks are kept if
they were made with the same parameters (else they are redone).

CAM storage (np.savez_compressed, float16): measured ~1.2 MB per 640x480 image with 3 classes at full
resolution (zlib gains only ~1.5x on float16), i.e. ~100 GB for COCO's 82k train images; at
--store_scale 0.5 (COCO's default) ~0.33 MB per image, ~27 GB; at 0.25 ~0.09 MB, ~7 GB. The CAMs are
bilinear upsamplings of stride-16 maps, so half resolution loses very little (measured on synthetic
stride-16 CAMs: mean abs error 0.001, 0.5% of pixels change label at threshold 0.42). VOC at full
resolution: ~0.35 MB per image (500x375, 1.5 classes), ~4 GB for train_aug. Toy (96 px, random S):
~17 KB per image, 32 MB for its 2000 train_aug images.
"""
import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing as mp
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common

PRESETS = common.presets(
    voc=dict(checkpoint="out/voc/refine/checkpoint.pt", out="out/voc/pseudo", scales="1.0,1.2",
             bg_threshold=0.43, store_scale=1.0, batch_size=8),
    coco=dict(checkpoint="out/coco/refine/checkpoint.pt", out="out/coco/pseudo", scales="1.0,0.8,1.2",
              bg_threshold=0.42, store_scale=0.5, batch_size=8),
    # Toy: VOC's recipe (scales, CRF). The threshold was fixed once by the developers from a seed sweep
    # on toy train (best 0.55-0.70), as the release fixed VOC's 0.43; no run picks it from ground truth.
    toy=dict(checkpoint="out/toy/refine/checkpoint.pt", out="out/toy/pseudo", scales="1.0,1.2",
             bg_threshold=0.60, store_scale=1.0, batch_size=64),
)

# METHOD.md's dense CRF (the authors' release): pairwise terms and mean-field iterations.
CRF_DEFAULTS = dict(gauss_sxy=4, gauss_compat=3, bi_sxy=83, bi_srgb=5, bi_compat=3, iters=10)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(p)
    p._option_string_actions["--workers"].help = ("processes decoding images (CAMs) and running the CRF "
                                                  "(masks); 0 = inline")
    p.add_argument("--checkpoint", type=str, default=None, help="S checkpoint (stage c: OUT of train_refine.py)")
    p.add_argument("--split", type=str, default="train_aug", help="image list to make pseudo masks for")
    p.add_argument("--out", type=str, default=None, help="output folder (cams/, masks/, vis/, log.txt)")
    p.add_argument("--mask_dir", type=str, default=None, help="where the PNGs go (default OUT/masks)")
    p.add_argument("--size", type=int, default=None,
                   help="longer image side at scale 1.0 (default: the checkpoint's training size)")
    p.add_argument("--scales", type=str, default="1.0,1.2", help="comma list of CAM scales (each also flipped)")
    p.add_argument("--batch_size", type=int, default=8, help="images per S forward (equal-sized images only)")
    p.add_argument("--store_scale", type=float, default=1.0,
                   help="CAMs are stored at this fraction of the image size (upsampled bilinearly on read)")
    p.add_argument("--bg_threshold", type=float, default=0.43, help="constant background score")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True, help="dense CRF on the masks")
    p.add_argument("--crf_gt_prob", type=float, default=0.7, help="CRF unary: confidence in the label")
    p.add_argument("--crf_gauss_sxy", type=float, default=CRF_DEFAULTS["gauss_sxy"], help="Gaussian kernel sxy")
    p.add_argument("--crf_gauss_compat", type=float, default=CRF_DEFAULTS["gauss_compat"], help="Gaussian compat")
    p.add_argument("--crf_bi_sxy", type=float, default=CRF_DEFAULTS["bi_sxy"], help="bilateral kernel sxy")
    p.add_argument("--crf_bi_srgb", type=float, default=CRF_DEFAULTS["bi_srgb"], help="bilateral kernel srgb")
    p.add_argument("--crf_bi_compat", type=float, default=CRF_DEFAULTS["bi_compat"], help="bilateral compat")
    p.add_argument("--crf_iters", type=int, default=CRF_DEFAULTS["iters"], help="mean-field iterations")
    p.add_argument("--vis", type=int, default=0, help="write image | CAM | mask pictures for the first N images")
    p.add_argument("--cams_only", action="store_true", help="compute the CAMs, make no masks")
    p.add_argument("--masks_only", action="store_true",
                   help="reuse OUT/cams (no checkpoint, no GPU): only threshold + CRF + PNGs")
    return p


# ----------------------------------------------------------------------------------------------
# Dense CRF (also imported by train_seg.py for its optional post-processing)
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


def dense_crf(image, labels, n_labels=None, gt_prob=0.7, **kw):
    """Refine a label map with a dense CRF (pydensecrf2), the pseudo-mask CRF of METHOD.md.

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
def save_cams(path, cams, classes, size):
    with common.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, cams=cams.astype(np.float16), classes=np.asarray(classes, np.int16),
                            size=np.asarray(size, np.int32))


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


def _size_batches(root, ids, todo, batch_size):
    """Batches of indices into `ids` whose images share one size (headers only are read)."""
    if batch_size == 1:
        return [[n] for n in todo]
    groups = {}
    for n in todo:
        path = common.image_path(root, ids[n])
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError as e:
            raise ValueError(f"cannot read image {path} ({e})") from e
        groups.setdefault(size, []).append(n)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda b: b[0])


def _fingerprint(state_dict):
    h = hashlib.sha1()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
        with common.autocast(device, amp):
            logits = S(torch.cat([xs, xs.flip(-1)]))
        m = torch.relu(logits.float())  # not sigmoid: it saturates at 1 and flattens the map
        if keep is not None:
            m = m[:, keep]
        m = F.interpolate(m, (H, W), mode="bilinear", align_corners=False)
        total = total + m[:B] + m[B:].flip(-1)  # the flipped half flipped back
    # --------------------------------------------------
    return total


def compute_cams(args, ids, cam_dir, log):
    from semples import load_mask_generator  # here, so that the CRF worker processes stay light
    device, _, _ = common.setup_device(args.device)
    S, ckpt = load_mask_generator(args.checkpoint, device)
    names = common.read_class_names(args.data, args.dataset)
    if ckpt["class_names"] != names:
        raise ValueError(f"--checkpoint {args.checkpoint} was trained for classes {ckpt['class_names'][:3]}... "
                         f"({ckpt['num_classes']}), --data {args.data} has {names[:3]}... ({len(names)})")
    size = args.size or ckpt["args"]["size"]
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
    meta = {"fingerprint": _fingerprint(ckpt["model"]), "scales": scales, "size": size,
            "store_scale": args.store_scale, "class_names": names, "checkpoint": args.checkpoint}
    meta_path = os.path.join(cam_dir, "meta.json")
    paths = [os.path.join(cam_dir, f"{i}.npz") for i in ids]
    todo = [n for n, p in enumerate(paths) if not os.path.exists(p)]
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        diff = [k for k in meta if k != "checkpoint" and old.get(k) != meta[k]]
        if diff and len(todo) < len(ids):
            raise ValueError(f"{cam_dir} holds CAMs made with other {', '.join(diff)} ({old.get('checkpoint')}); "
                             "pass another --out or delete that folder")
    with common.atomic_path(meta_path) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    y = torch.from_numpy(common.load_labels(args.data, ids, len(names), require_nonempty=False))
    log(f"cams: {len(todo)} of {len(ids)} images to compute ({len(ids) - len(todo)} exist) with "
        f"{args.checkpoint} (epoch {ckpt.get('epoch')}), scales {args.scales}, size {size}, on {device}")
    loader = torch.utils.data.DataLoader(common.ImageList(args.data, ids), batch_sampler=_size_batches(
        args.data, ids, todo, args.batch_size), num_workers=args.workers, pin_memory=device.type == "cuda")
    t0, nbytes, pending = time.time(), 0, []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.workers)) as saver:  # zlib frees the GIL
        for x, index in common.progress(loader, "cams"):
            yb = y[index]
            keep = yb.any(0).nonzero()[:, 0].tolist()  # classes labelled in any image of the batch
            total = multiscale_cams(S, x, scales, size, device, args.amp, keep) if keep else None
            H, W = x.shape[1:3]
            for b, n in enumerate(index.tolist()):
                present = yb[b].nonzero()[:, 0].tolist()
                if present:
                    # ---------------- algorithm logic ----------------
                    c = total[b, [keep.index(k) for k in present]]
                    lo, hi = c.amin((1, 2), keepdim=True), c.amax((1, 2), keepdim=True)
                    c = (c - lo) / (hi - lo + 1e-5)  # min-max per class
                    # --------------------------------------------------
                    if args.store_scale != 1:
                        hw = (max(1, round(H * args.store_scale)), max(1, round(W * args.store_scale)))
                        c = F.interpolate(c[None], hw, mode="bilinear", align_corners=False, antialias=True)[0]
                    c = c.half().cpu().numpy()
                else:
                    c = np.zeros((0, H, W), np.float16)
                pending.append(saver.submit(save_cams, paths[n], c, [k + 1 for k in present], (H, W)))
            while len(pending) > 4 * max(1, args.workers) * args.batch_size:
                pending.pop(0).result()
        for fut in pending:
            fut.result()
    dt = time.time() - t0
    if todo:
        nbytes = sum(os.path.getsize(paths[n]) for n in todo)
    log(f"cams: {len(todo)} computed in {dt:.1f}s ({len(todo) / max(dt, 1e-9):.1f} img/s), "
        f"{nbytes / max(1, len(todo)) / 1024:.1f} KB/image, {nbytes / 2**20:.1f} MB in {cam_dir}")


# ----------------------------------------------------------------------------------------------
# Masks: threshold + CRF, in worker processes
# ----------------------------------------------------------------------------------------------
def pseudo_mask(cams, classes, bg_threshold, image=None, crf=None):
    """cams [C, H, W] in [0, 1] of the present classes (1-based values `classes`) -> class-value map
    uint8 [H, W]. With `crf` (a dict: gt_prob and CRF_DEFAULTS' keys) and `image`, dense CRF on the labels."""
    # ---------------- algorithm logic ----------------
    bg = np.full((1,) + cams.shape[1:], bg_threshold, np.float64)  # float64 as eval_miou's sweep
    labels = np.concatenate([bg, cams]).argmax(0)  # the first maximum: a tie goes to the background
    if crf is not None and len(classes):
        labels = dense_crf(image, labels, len(classes) + 1, **crf)
    # --------------------------------------------------
    return np.concatenate([[0], classes]).astype(np.uint8)[labels]


def jet(v):
    """A jet-like colour map for v in [0, 1] -> uint8 [..., 3]."""
    v = np.clip(v, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def visualise(image, cams, mask):
    heat = cams.max(0) if len(cams) else np.zeros(image.shape[:2], np.float32)
    heat = (0.5 * image + 0.5 * jet(heat)).astype(np.uint8)
    colours = np.asarray(common.voc_palette(), np.uint8).reshape(256, 3)[mask]
    return np.concatenate([image, heat, colours], axis=1)


def _worker_init():
    torch.set_num_threads(1)


def _mask_task(task):
    """One image: read its CAM file and JPEG, write its PNG (and picture). Returns statistics."""
    image_id, cam_path, img_path, mask_path, vis_path, bg_threshold, crf = task
    cams, classes = load_cams(cam_path)
    image = common.read_image(img_path)
    if image.shape[:2] != cams.shape[1:]:
        raise ValueError(f"{cam_path} holds CAMs of size {cams.shape[1:]}, image {img_path} is {image.shape[:2]}")
    raw = pseudo_mask(cams, classes, bg_threshold)
    mask = pseudo_mask(cams, classes, bg_threshold, image, crf) if crf is not None else raw
    common.save_mask(mask_path, mask)
    if vis_path:
        with common.atomic_path(vis_path) as tmp:
            Image.fromarray(visualise(image, cams, mask)).save(tmp, format="JPEG", quality=90)
    return image_id, float((mask > 0).mean()), float((mask != raw).mean())


def make_masks(args, ids, cam_dir, mask_dir, log):
    missing = [i for i in ids if not os.path.exists(os.path.join(cam_dir, f"{i}.npz"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} CAM files missing in {cam_dir} (e.g. {missing[0]}.npz); run "
                                "make_pseudo.py without --masks_only first")
    crf = None
    if args.crf:
        crf = dict(gt_prob=args.crf_gt_prob, gauss_sxy=args.crf_gauss_sxy, gauss_compat=args.crf_gauss_compat,
                   bi_sxy=args.crf_bi_sxy, bi_srgb=args.crf_bi_srgb, bi_compat=args.crf_bi_compat,
                   iters=args.crf_iters)
    meta_path = os.path.join(cam_dir, "meta.json")
    with open(meta_path) as f:
        cams_meta = {k: v for k, v in json.load(f).items() if k != "checkpoint"}  # path moves don't matter
    params = {"bg_threshold": args.bg_threshold, "crf": crf, "cams": cams_meta}
    params_path = os.path.join(mask_dir, "params.json")
    mask_paths = {i: os.path.join(mask_dir, f"{i}.png") for i in ids}
    old = None
    if os.path.exists(params_path):
        with open(params_path) as f:
            old = json.load(f)
    if old != params:  # masks made with other parameters (or unknown ones) are redone, not mixed
        stale = [p for p in mask_paths.values() if os.path.exists(p)]
        if stale:
            log(f"masks: {len(stale)} PNGs in {mask_dir} were made with other parameters: redoing them")
        for p in stale:
            os.remove(p)
    with common.atomic_path(params_path) as tmp, open(tmp, "w") as f:
        json.dump(params, f, indent=1)
    vis = set(ids[:args.vis])
    vis_path = {i: os.path.join(args.out, "vis", f"{i}.jpg") if i in vis else None for i in ids}
    tasks = [(i, os.path.join(cam_dir, f"{i}.npz"), common.image_path(args.data, i), mask_paths[i], vis_path[i],
              args.bg_threshold, crf) for i in ids
             if not os.path.exists(mask_paths[i]) or (vis_path[i] and not os.path.exists(vis_path[i]))]
    log(f"masks: {len(tasks)} of {len(ids)} to write ({len(ids) - len(tasks)} exist), bg_threshold "
        f"{args.bg_threshold}, crf {'on' if crf else 'off'}, {args.workers} worker processes")
    t0, stats = time.time(), []
    if args.workers > 0 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(args.workers, initializer=_worker_init) as pool:
            results = pool.imap_unordered(_mask_task, tasks, chunksize=4)
            stats = list(common.progress(results, "masks", total=len(tasks)))
    else:
        for t in common.progress(tasks, "masks"):
            stats.append(_mask_task(t))
    dt = time.time() - t0
    fg = 100 * np.mean([s[1] for s in stats]) if stats else float("nan")
    changed = 100 * np.mean([s[2] for s in stats]) if stats else float("nan")
    log(f"masks: {len(stats)} written in {dt:.1f}s ({len(stats) / max(dt, 1e-9):.1f} img/s), foreground "
        f"{fg:.1f}% of pixels, changed by CRF {changed:.1f}%, in {mask_dir}")


def main(args):
    if args.cams_only and args.masks_only:
        raise ValueError("--cams_only and --masks_only exclude each other")
    if not 0 < args.store_scale <= 1:
        raise ValueError(f"--store_scale must lie in (0, 1], got {args.store_scale}")
    args.mask_dir = args.mask_dir or os.path.join(args.out, "masks")
    log = common.Logger(args.out)
    common.save_args(args, args.out, "args_masks.json" if args.masks_only else "args.json")
    ids = common.read_ids(args.data, args.split)
    cam_dir = os.path.join(args.out, "cams")
    if not args.masks_only:
        compute_cams(args, ids, cam_dir, log)
    if not args.cams_only:
        make_masks(args, ids, cam_dir, args.mask_dir, log)
        log(f"done: evaluate with `python eval_miou.py --dataset {args.dataset} --data {args.data} "
            f"--pred {args.mask_dir}` (and `--cams {cam_dir}` for the seeds)")


if __name__ == "__main__":
    main(common.parse_args(build_parser(), PRESETS))
