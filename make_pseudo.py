"""Pseudo masks from the refined mask generator S: multi-scale CAMs -> constant background plane ->
argmax -> dense CRF -> VOC-palette PNGs, the training targets of the segmenter (train_seg.py).

CAM of image X (docs/method.md, as the authors' release): for each scale s, X resized so that its longer
side is s * --size (aspect kept; --size defaults to the square size a ResNet S was trained at; a DeiT S sees
X at its own size times s, as WeakTr), plus its horizontal flip; relu(S(.)) (the CAM, as CLIMS/IRN make it;
a DeiT S's fine CAM) upsampled bilinearly to X's size; summed
over scales and flips; kept for X's labelled classes only; min-max normalised per class. Pseudo mask: argmax over
[--bg_threshold plane, present classes] (a tie goes to the background), then dense CRF (unary from
those labels with gt_prob 0.7; Gaussian sxy 4 compat 3; bilateral sxy 83 srgb 5 compat 3; 10 iters).
The threshold defaults are per dataset and S family (semples/presets.py, BG_THRESHOLD: VOC and COCO 0.15 for
a ResNet S, the CAM threshold of IRN and CLIMS; 0.43 / 0.42 for a DeiT S, WeakTr's; toy: mass): the pipeline
never looks at ground truth. `eval_miou.py --cams OUT/cams` sweeps the threshold on train-set GT, which is how
seeds are *reported*, not how it is chosen here.
--bg_threshold mass (the toy preset; an option for data of your own) gives each class of each image its own
threshold, read off its CAM: the value above which lies the share mean(M) of the pixels, so that the hard mask
keeps the area of the soft mask M that stages (a) and (c) train (cams.mass_thresholds). Why: those stages make
the CAMs more compact, which moves the best constant threshold down (0.05-0.1 on the toy worlds), so a fixed
one can lower the masks where the seeds rise; and the best constant differs between datasets (docs/toy.md,
"Threshold").

Toy world (CPU):
    python make_pseudo.py --dataset toy --device cpu
    python eval_miou.py --dataset toy --cams out/toy/pseudo/cams        # seed mIoU (threshold sweep)
    python eval_miou.py --dataset toy --pred out/toy/pseudo/masks       # pseudo-mask mIoU
VOC (one GPU; CRF in 16 processes):
    python make_pseudo.py --dataset voc --workers 16
Another background threshold, reusing the saved CAMs (no GPU needed):
    python make_pseudo.py --dataset voc --masks_only --bg_threshold 0.45 --mask_dir out/voc/pseudo/masks_045
Pseudo masks from CAMs made elsewhere, e.g. the authors' release or WeakTr ({id}.npy files; --cams implies
--masks_only; their CAMs are DeiT CAMs, whose threshold is WeakTr's 0.43):
    python make_pseudo.py --dataset voc --cams release/cams --bg_threshold 0.43 --out out/voc/release_masks
CAMs in the release's format, for code that reads it (--cam_format npy; full resolution: --store_scale 1):
    python make_pseudo.py --dataset voc --cams_only --cam_format npy --out out/voc/pseudo_npy
Sharded: --shard i/N (i = 0..N-1) does images ids[i::N] of the list only, into the same OUT (each shard
writes its own files; together they are one unsharded run's). Four processes, one GPU each, or a job array:
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python make_pseudo.py --dataset coco --shard $i/4 & done; wait
    sbatch --array=0-3 --wrap 'python make_pseudo.py --dataset coco --shard $SLURM_ARRAY_TASK_ID/4'
Then evaluate the whole list once every shard is done. A shard holds OUT/shards/IofN (its lock, its args.json);
its log lines in OUT/log.txt begin with [shard i/N]. Do not start an unsharded run into an OUT that shards are
writing to (it would clean up their half-written files).

Writes OUT/cams/{id}.npz (keys: `cams` float16 [C_present, h, w], min-max normalised; `classes` the
C_present 1-based class values; `size` the image's [H, W]; h, w = H, W times --store_scale; `meta`
what made them: checkpoint fingerprint, path and epoch, scales, size, store_scale, class names),
OUT/masks/{id}.png (VOC palette; --mask_dir; the PNG's text holds the key of its CAM file's meta, the
threshold and the CRF), OUT/masks/params.json (the last run's), OUT/vis/{id}.jpg (--vis N: image | CAM
heatmap | pseudo mask), OUT/log.txt, OUT/args.json (args_masks.json for --masks_only). Both phases
resume, file by file: an existing CAM file is kept if its own meta and classes are this run's (a file
made with another checkpoint, scales, size or labels is an error, whichever split made it), an
existing mask is kept if its key is this run's (else it is redone).

--cam_format npy writes OUT/cams/{id}.npy instead, the format of the authors' release and WeakTr:
np.save(path, cam_dict), cam_dict = {k: H x W float32 map} for each labelled class, k its 0-based foreground
index (class value k + 1), min-max normalised, at the image's full size; read with
np.load(path, allow_pickle=True).item(). The values are the npz's (float16-rounded), so masks and seed sweeps
are the same from either. What made them is kept beside them in OUT/cams/cam_meta.json (the format has no
room for it). Reading (--masks_only, --cams DIR, eval_miou.py --cams) takes either format, whichever the
folder holds for every image of the list (--cam_format says which where it holds both). A .npy file is a
pickle, and unpickling can run code: read only .npy files you trust (your own, or a release from its authors).

CAM storage (np.savez_compressed, float16): measured ~1.2 MB per 640x480 image with 3 classes at full
resolution (zlib gains only ~1.5x on float16), i.e. ~100 GB for COCO's 82k train images; at
--store_scale 0.5 (COCO's default) ~0.33 MB per image, ~27 GB; at 0.25 ~0.09 MB, ~7 GB. The CAMs are
bilinear upsamplings of stride-16 maps, so half resolution loses very little (measured on synthetic
stride-16 CAMs: mean abs error 0.001, 0.5% of pixels change label at threshold 0.42). VOC at full
resolution: ~0.35 MB per image (500x375, 1.5 classes), ~4 GB for train_aug. Toy (96 px, random S):
~17 KB per image, 32 MB for its 2000 train_aug images. The .npy format is uncompressed float32 (4 bytes a
pixel and class): ~1.1 MB per VOC image (~12 GB for train_aug), ~3.6 MB per COCO image (~290 GB).
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

from semples import datasets, presets, runtime
from semples.cams import (CRF_DEFAULTS, CRF_GT_PROB, MASS, cam_format, cam_meta, load_cams, multiscale_cams,
                          pseudo_mask, read_npy_meta, save_cams, write_npy_meta)

PRESETS = presets.of("make_pseudo")


def build_parser():
    p = runtime.new_parser(__doc__)
    runtime.add_common_flags(p)
    p.add_argument("--checkpoint", type=str, default=None, help="S checkpoint (stage c: OUT of train_refine.py)")
    p.add_argument("--split", type=str, default="train_aug", help="image list to make pseudo masks for")
    p.add_argument("--out", type=str, default=None, help="output folder (cams/, masks/, vis/, log.txt)")
    p.add_argument("--mask_dir", type=str, default=None, help="where the PNGs go (default OUT/masks)")
    p.add_argument("--size", type=runtime.positive_int, default=None,
                   help="longer image side at scale 1.0 (default: a ResNet S's training size; a DeiT S sees each "
                        "image at its own size, as WeakTr)")
    p.add_argument("--scales", type=runtime.float_list, default="1.0,1.2",
                   help="comma list of CAM scales (each also flipped)")
    p.add_argument("--batch_size", type=runtime.positive_int, default=8, help="images per S forward (equal-sized images only)")
    p.add_argument("--store_scale", type=runtime.positive_float, default=1.0,
                   help="CAMs are stored at this fraction of the image size (upsampled bilinearly on read)")
    p.add_argument("--bg_threshold", type=threshold, default=None,
                   help="constant background score, or 'mass': each class's threshold read off its own CAM (see "
                        "above); default: the one of the S that made the CAMs on this dataset (presets.BG_THRESHOLD: "
                        "VOC 0.15 for a ResNet S, IRN's and CLIMS's; 0.43 for a DeiT S, WeakTr's; toy mass)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                   help="dense CRF on the masks (cams.CRF_DEFAULTS, unary gt_prob cams.CRF_GT_PROB)")
    p.add_argument("--vis", type=runtime.nonnegative_int, default=0, help="write image | CAM | mask pictures for the first N images")
    p.add_argument("--cams_only", action="store_true", help="compute the CAMs, make no masks")
    p.add_argument("--masks_only", action="store_true",
                   help="reuse OUT/cams (no checkpoint, no GPU): only threshold + CRF + PNGs")
    p.add_argument("--cams", type=str, default=None,
                   help="make the masks from this folder's CAM files ({id}.npz, ours, or {id}.npy, the authors' "
                        "release / WeakTr's: only load .npy files you trust) instead of OUT/cams (implies --masks_only)")
    p.add_argument("--cam_format", type=str, default=None, choices=("npz", "npy"),
                   help="CAM files written: npz (ours, float16, compressed; the default) or npy (the release's "
                        "dict of full-size float32 maps); read: whichever the folder holds (this flag says which "
                        "where it holds both)")
    p.add_argument("--shard", type=shard, default=None,
                   help="I/N: do images ids[I::N] of --split only (I = 0..N-1), into the same OUT as the other shards")
    return p


def threshold(text):
    """--bg_threshold: a number in [0, 1], or the word mass (cams.MASS)."""
    return MASS if text == MASS else runtime.unit_float(text)


def shard(text):
    """--shard I/N -> (I, N) with 0 <= I < N."""
    i, sep, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = None
    if not sep or n is None or n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got '{text}'")
    return i, n


# ----------------------------------------------------------------------------------------------
# CAMs of S, written as CAM files (cams.save_cams)
# ----------------------------------------------------------------------------------------------
def _size_batches(root, ids, todo, batch_size):
    """Batches of indices into `ids` whose images share one size (headers only are read)."""
    if batch_size == 1:
        return [[n] for n in todo]
    groups = {}
    for n in todo:
        path = datasets.image_path(root, ids[n])
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError as e:
            raise ValueError(f"cannot read image {path} ({e})") from e
        groups.setdefault(size, []).append(n)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda b: b[0])


def compute_cams(args, ids, cam_dir, fmt, log):
    from semples.method import minmax, weights_fingerprint  # here: CRF workers stay light
    from semples.network import DEITS, load_mask_generator
    device, _, _ = runtime.setup_device(args.device)
    names = datasets.read_class_names(args.data, args.dataset)
    S, ckpt = load_mask_generator(args.checkpoint, device, "--checkpoint", names)
    backbone = ckpt["args"]["backbone"]
    # a DeiT S sees each image at its own size times the scale (WeakTr); a ResNet S at its training size
    size = args.size or (None if backbone in DEITS else ckpt["args"]["size"])
    scales = args.scales
    meta = {"fingerprint": weights_fingerprint(ckpt["model"]), "scales": scales, "size": size,
            "store_scale": args.store_scale, "class_names": names, "backbone": backbone,
            "checkpoint": os.path.abspath(args.checkpoint), "epoch": ckpt.get("epoch")}
    y = torch.from_numpy(datasets.load_labels(args.data, ids, len(names), require_nonempty=False))
    paths = [os.path.join(cam_dir, f"{i}.{fmt}") for i in ids]
    todo = [n for n, p in enumerate(paths) if not os.path.exists(p)]
    # each image file as it is now (size, time): a CAM file is reused only for the image it was made from
    stamps = [datasets.file_stamp(datasets.image_path(args.data, i)) for i in ids]
    if fmt == "npy":
        claim_npy_folder(cam_dir, meta)
    check_existing_cams(paths, set(todo), meta, y, cam_dir, stamps if fmt == "npz" else None)
    log(f"cams: {len(todo)} of {len(ids)} images to compute ({len(ids) - len(todo)} exist) with "
        f"{args.checkpoint} (epoch {ckpt.get('epoch')}), scales {args.scales}, size {size}, on {device}")
    loader = torch.utils.data.DataLoader(datasets.ImageList(args.data, ids), batch_sampler=_size_batches(
        args.data, ids, todo, args.batch_size), num_workers=args.workers, pin_memory=device.type == "cuda")
    t0, nbytes, pending = time.time(), 0, []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.workers)) as saver:  # zlib frees the GIL
        for x, index in runtime.progress(loader, "cams"):
            yb = y[index]
            keep = yb.any(0).nonzero()[:, 0].tolist()  # classes labelled in any image of the batch
            total = multiscale_cams(S, x, scales, size, device, args.amp, keep) if keep else None
            H, W = x.shape[1:3]
            for b, n in enumerate(index.tolist()):
                present = yb[b].nonzero()[:, 0].tolist()
                if present:
                    # ---------------- algorithm logic ----------------
                    c = total[b, [keep.index(k) for k in present]]
                    c = minmax(c)  # per class
                    # --------------------------------------------------
                    if args.store_scale != 1:
                        hw = (max(1, round(H * args.store_scale)), max(1, round(W * args.store_scale)))
                        c = F.interpolate(c[None], hw, mode="bilinear", align_corners=False, antialias=True)[0]
                    c = c.half().cpu().numpy()  # .npy: the same float16 values, as float32
                else:
                    c = np.zeros((0, H, W), np.float16)
                own = {**meta, "image": stamps[n]} if fmt == "npz" else meta  # .npy: one record per folder
                pending.append(saver.submit(save_cams, paths[n], c, [k + 1 for k in present], (H, W), own))
            while len(pending) > 4 * max(1, args.workers) * args.batch_size:
                pending.pop(0).result()
        for fut in pending:
            fut.result()
    dt = time.time() - t0
    if todo:
        nbytes = sum(os.path.getsize(paths[n]) for n in todo)
    log(f"cams: {len(todo)} computed in {dt:.1f}s ({len(todo) / max(dt, 1e-9):.1f} img/s), "
        f"{nbytes / max(1, len(todo)) / 1024:.1f} KB/image, {nbytes / 2**20:.1f} MB in {cam_dir}")


UNKEYED = ("checkpoint", "epoch")  # where a checkpoint lies and its epoch do not change the CAMs


def claim_npy_folder(cam_dir, meta):
    """Before the first .npy CAM file is written: record this run's meta beside them (cams.NPY_META). A folder
    that already holds .npy files keeps its record, which check_existing_cams compares with this run's (a
    release's folder, with none, is not written into)."""
    os.makedirs(cam_dir, exist_ok=True)
    held = [name for name in os.listdir(cam_dir) if name.endswith(".npy")]
    old = read_npy_meta(cam_dir)  # read after the listing: another shard writes it before its first file
    if old is not None and {k: v for k, v in old.items() if k not in UNKEYED} == \
            {k: v for k, v in meta.items() if k not in UNKEYED}:
        return
    if held:
        made = "by another run (its cam_meta.json differs)" if old else "elsewhere (no cam_meta.json beside them)"
        raise ValueError(f"{cam_dir} holds {len(held)} .npy CAM files made {made}, e.g. "
                         f"{os.path.join(cam_dir, held[0])}; pass another --out, or delete them to recompute them")
    write_npy_meta(cam_dir, meta)


def check_existing_cams(paths, todo, meta, y, cam_dir, stamps=None):
    """Existing CAM files are reused only if their own meta and classes are this run's: a file made with
    another checkpoint, scales, size or labels (by any earlier run, for any split), or (npz, `stamps`) from
    another image file than the one under its name now, is an error."""
    stale = []
    for n, path in enumerate(paths):
        if n in todo:
            continue
        old, classes = cam_meta(path)
        diff = ["settings (an unkeyed file)"] if old is None else [
            k for k in meta if k not in UNKEYED and old.get(k) != meta[k]]
        if classes != (y[n].nonzero()[:, 0] + 1).tolist():
            diff.append("labels (its image's mask or labels file entry changed)")
        if stamps is not None and old is not None and old.get("image") != stamps[n]:
            diff.append("image (the image file was replaced, or --data is another dataset)")
        if diff:
            stale.append((path, diff, old or {}))
    if stale:
        path, diff, old = stale[0]
        raise ValueError(f"{cam_dir} holds CAMs of {len(stale)} of these {len(paths)} images made with other "
                         f"{', '.join(diff)} than this run's, e.g. {path} (from --checkpoint {old.get('checkpoint')} "
                         f"epoch {old.get('epoch')}, scales {old.get('scales')}); pass another --out, or delete "
                         "those files to recompute them")


# ----------------------------------------------------------------------------------------------
# Masks: threshold + CRF, in worker processes
# ----------------------------------------------------------------------------------------------
def jet(v):
    """A jet-like colour map for v in [0, 1] -> uint8 [..., 3]."""
    v = np.clip(v, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def visualise(image, cams, mask):
    heat = cams.max(0) if len(cams) else np.zeros(image.shape[:2], np.float32)
    heat = (0.5 * image + 0.5 * jet(heat)).astype(np.uint8)
    colours = np.asarray(datasets.voc_palette(), np.uint8).reshape(256, 3)[mask]
    return np.concatenate([image, heat, colours], axis=1)


def _worker_init():
    torch.set_num_threads(1)


def _mask_task(task):
    """One image: read its CAM file and JPEG, write its PNG (and picture). Returns statistics."""
    image_id, cam_path, img_path, mask_path, vis_path, bg_threshold, crf, key, num_classes = task
    image = datasets.read_image(img_path)
    cams, classes = load_cams(cam_path, image.shape[:2])  # a file of another size than the image is refused
    if len(classes) and classes.max() > num_classes:
        raise ValueError(f"CAM file {cam_path} holds class value {classes.max()} (0-based key {classes.max() - 1}), "
                         f"the dataset has {num_classes} classes (values 1..{num_classes})")
    raw = pseudo_mask(cams, classes, bg_threshold)
    mask = pseudo_mask(cams, classes, bg_threshold, image, crf) if crf is not None else raw
    datasets.save_mask(mask_path, mask, key)
    if vis_path:
        with runtime.atomic_path(vis_path) as tmp:
            Image.fromarray(visualise(image, cams, mask)).save(tmp, format="JPEG", quality=90)
    return image_id, float((mask > 0).mean()), float((mask != raw).mean())


def make_masks(args, ids, cam_dir, fmt, mask_dir, vis, log):
    num_classes = len(datasets.read_class_names(args.data, args.dataset))
    crf = None
    if args.crf:
        crf = dict(gt_prob=CRF_GT_PROB, **CRF_DEFAULTS)
    params = {"bg_threshold": args.bg_threshold, "crf": crf}
    with runtime.atomic_path(os.path.join(mask_dir, "params.json")) as tmp, open(tmp, "w") as f:
        json.dump(params, f, indent=1)
    tasks, redo = [], 0
    for i in ids:  # each mask is keyed on its CAM file's meta and classes, the threshold and the CRF
        cam_path, mask_path = os.path.join(cam_dir, f"{i}.{fmt}"), os.path.join(mask_dir, f"{i}.png")
        meta, classes = cam_meta(cam_path)
        made_from = {k: v for k, v in meta.items() if k not in UNKEYED} if meta else os.stat(cam_path).st_mtime_ns
        if fmt == "npy":  # the folder's meta is not the file's own: the file's time and size too
            st = os.stat(cam_path)
            made_from = [made_from, st.st_mtime_ns, st.st_size]
        key = hashlib.sha256(json.dumps([made_from, classes, params], sort_keys=True).encode()).hexdigest()[:16]
        vis_path = os.path.join(args.out, "vis", f"{i}.jpg") if i in vis else None
        old = datasets.mask_key(mask_path)
        if old != key and os.path.exists(mask_path):
            redo += 1
        if old != key or (vis_path and not os.path.exists(vis_path)):
            tasks.append((i, cam_path, datasets.image_path(args.data, i), mask_path, vis_path, args.bg_threshold,
                          crf, key, num_classes))
    if redo:
        log(f"masks: {redo} PNGs in {mask_dir} were made from other CAMs or parameters: redoing them")
    log(f"masks: {len(tasks)} of {len(ids)} to write ({len(ids) - len(tasks)} exist) from {cam_dir}/*.{fmt}, "
        f"bg_threshold {args.bg_threshold}, crf {'on' if crf else 'off'}, {args.workers} worker processes")
    t0, stats = time.time(), []
    if args.workers > 0 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(args.workers, initializer=_worker_init) as pool:
            results = pool.imap_unordered(_mask_task, tasks, chunksize=4)
            stats = list(runtime.progress(results, "masks", total=len(tasks)))
    else:
        for t in runtime.progress(tasks, "masks"):
            stats.append(_mask_task(t))
    dt = time.time() - t0
    fg = 100 * np.mean([s[1] for s in stats]) if stats else float("nan")
    changed = 100 * np.mean([s[2] for s in stats]) if stats else float("nan")
    log(f"masks: {len(stats)} written in {dt:.1f}s ({len(stats) / max(dt, 1e-9):.1f} img/s), foreground "
        f"{fg:.1f}% of pixels, changed by CRF {changed:.1f}%, in {mask_dir}")


def cams_backbone(path):
    """The backbone of the S that made a CAM file, from its record. A .npy folder without one is a release's
    (WeakTr's DeiT CAMs); our files made before the record held it are a ResNet S's."""
    meta, _ = cam_meta(path)
    if meta is None:
        return "deit_s" if path.endswith(".npy") else "resnet50"
    return meta.get("backbone", "resnet50")


def shard_dir(args):
    """OUT/shards/IofN of a --shard run (its lock and args), None without --shard."""
    return os.path.join(args.out, "shards", f"{args.shard[0]}of{args.shard[1]}") if args.shard else None


def main(args):
    if args.cams_only and args.masks_only:
        raise ValueError("--cams_only and --masks_only exclude each other")
    if args.cams is not None:
        if args.cams_only:
            raise ValueError("--cams DIR makes masks from DIR's CAM files: it excludes --cams_only")
        if not os.path.isdir(args.cams):
            raise FileNotFoundError(f"--cams folder {args.cams} not found")
        args.masks_only = True
    if not 0 < args.store_scale <= 1:
        raise ValueError(f"--store_scale must lie in (0, 1], got {args.store_scale}")
    if args.cam_format == "npy" and args.store_scale != 1 and not args.masks_only:
        raise ValueError(f"--cam_format npy writes the release's format, full-size maps: pass --store_scale 1 (got "
                         f"{args.store_scale}, e.g. COCO's preset; ~3.6 MB per COCO image), or --cam_format npz")
    args.mask_dir = args.mask_dir or os.path.join(args.out, "masks")
    log = runtime.Logger(args.out)
    if args.shard:
        base, tag = log, f"[shard {args.shard[0]}/{args.shard[1]}] "
        log = lambda msg: base(tag + msg)  # noqa: E731  (one appended line each: the shards' lines do not mix)
    if not args.cams_only:
        runtime.make_dir(args.mask_dir, "--mask_dir")
    runtime.save_args(args, shard_dir(args) or args.out, "args_masks.json" if args.masks_only else "args.json")
    all_ids = datasets.read_ids(args.data, args.split)
    ids = all_ids[args.shard[0]::args.shard[1]] if args.shard else all_ids
    vis = set(all_ids[:args.vis]) & set(ids)  # the pictures an unsharded run makes, by whichever shard has them
    cam_dir = args.cams or os.path.join(args.out, "cams")
    if args.shard:
        log(f"shard {args.shard[0]}/{args.shard[1]}: {len(ids)} of the {len(all_ids)} images of '{args.split}'")
        if not ids:
            return
    if not args.masks_only:
        fmt = args.cam_format or "npz"
        compute_cams(args, ids, cam_dir, fmt, log)
    else:
        fmt = cam_format(cam_dir, ids, args.cam_format, "--cams" if args.cams else "the CAM folder",
                         "" if args.cams else "; run make_pseudo.py without --masks_only first")
    if not args.cams_only:
        if args.bg_threshold is None:  # the threshold of the S that made the CAMs
            backbone = cams_backbone(os.path.join(cam_dir, f"{ids[0]}.{fmt}"))
            args.bg_threshold = presets.bg_threshold(args.dataset, backbone)
            log(f"masks: --bg_threshold {args.bg_threshold}, the preset of a {backbone} S on {args.dataset}")
        make_masks(args, ids, cam_dir, fmt, args.mask_dir, vis, log)
        then = f"once all {args.shard[1]} shards are done, " if args.shard else ""
        log(f"done: {then}evaluate with `python eval_miou.py --dataset {args.dataset} --data {args.data} "
            f"--pred {args.mask_dir}` (and `--cams {cam_dir}` for the seeds)")


def hold(args):
    """What a run holds (runtime.hold_folder): OUT, or for a --shard run OUT/shards/IofN, since all the shards write
    to OUT at once (holding OUT would refuse the second shard and clean up the others' half-written files)."""
    if not args.shard:
        return runtime.hold_folder(args.out)
    pid = runtime.lock_holder(args.out)
    if pid is not None:
        raise ValueError(f"--out {args.out} is in use by an unsharded run (pid {pid}): wait for it to end, or pass "
                         f"another --out; if no such run exists, remove {os.path.join(args.out, runtime.LOCK)}")
    return runtime.hold_folder(shard_dir(args), "--shard")


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS, hold=hold)
