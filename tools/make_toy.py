"""The toy world: a procedural dataset in exact PASCAL VOC 2012 layout, with the class/background
co-occurrence bias SemPLeS is built to remove, plus a tiny CLIP pretrained on it. It lets the whole
pipeline run, be tested and be measured end to end on a 2-core CPU (this script: about 4 minutes).

    .venv/bin/python tools/make_toy.py --out data/toy

Writes OUT/JPEGImages/{id}.jpg, OUT/SegmentationClass/{id}.png (0 background, 1..K, 255 border band),
OUT/ImageSets/Segmentation/{train_aug,train,val}.txt, OUT/class_names.txt, OUT/clusters.json (category
clusters, a copy of semples/clusters/toy.json), OUT/toy_meta.json
(generation args, class -> home background, per-object backgrounds, completion marker) and
OUT/tiny_clip.pt ({"state_dict", "meta"}, read by clip.load).
Work already done with the same arguments is skipped; --force redoes everything.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torchvision.ops import roi_align

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
import clip
from semples import datasets, runtime
from semples.method import FILLS, clip_normalise, fill_colour

GEN_VERSION = 1
# name, home background, object length range (fraction of the image side), max |rotation| (degrees)
CLASSES = [("boat", "water", (0.34, 0.6), 10), ("plane", "sky", (0.4, 0.7), 35),
           ("car", "road", (0.34, 0.55), 8), ("train", "rails", (0.55, 0.9), 5),
           ("cow", "grass", (0.34, 0.55), 8), ("sofa", "indoor", (0.4, 0.62), 5),
           ("camel", "sand", (0.36, 0.6), 8), ("bird", "foliage", (0.24, 0.42), 25)]
NAMES = [c[0] for c in CLASSES]
HOME = {c[0]: c[1] for c in CLASSES}
# All backgrounds, in their top-to-bottom order when a scene is split in two (sky above water...).
BACKGROUNDS = ["sky", "foliage", "snow", "indoor", "rock", "sand", "grass", "water", "rails", "road"]
TEMPLATES = ["a photo of a {}.", "a photo of {}."]  # the first is the reported one; stages use the second
CLIP_CONFIG = dict(embed_dim=128, image_resolution=64, vision_layers=4, vision_width=128, vision_patch_size=16,
                   context_length=40, vocab_size=49408, transformer_width=128, transformer_heads=2,
                   transformer_layers=3)
STYLE = {  # part -> (base RGB, texture); parts are drawn in the order _shape lists them
    "boat": {"sail": ((240, 238, 230), "plain"), "mast": ((70, 50, 35), "plain"), "hull": ((165, 35, 30), "planks")},
    "plane": {"wing": ((170, 176, 188), "metal"), "tail": ((200, 30, 40), "plain"), "body": ((218, 221, 228), "metal")},
    "car": {"body": ((30, 70, 205), "metal"), "glass": ((160, 200, 225), "plain"),
            "tyre": ((25, 25, 25), "plain"), "hub": ((175, 175, 180), "plain")},
    "train": {"body": ((235, 125, 25), "plain"), "stripe": ((250, 235, 200), "plain"),
              "window": ((35, 35, 55), "plain"), "wheel": ((30, 30, 30), "plain")},
    "cow": {"body": ((238, 236, 230), "blotch")},
    "sofa": {"body": ((115, 40, 125), "fabric"), "leg": ((60, 40, 30), "plain")},
    "camel": {"body": ((140, 92, 48), "fur")},
    "bird": {"body": ((245, 205, 30), "feather"), "wing": ((200, 140, 20), "feather"),
             "beak": ((245, 110, 20), "plain"), "eye": ((20, 20, 20), "plain")},
}


# ----------------------------------------------------------------------------------------------
# Drawing helpers: value noise, shapes in a local frame (x in [-1, 1], y down), textures
# ----------------------------------------------------------------------------------------------
def _smooth(rng, cells, X, Y):
    """Smooth value noise in [0, 1] sampled at coordinates X, Y in [0, 1]; cells = n or (ny, nx)."""
    cy, cx = (cells, cells) if np.isscalar(cells) else cells
    G = rng.random((cy + 2, cx + 2))
    fx, fy = np.clip(X, 0, 1) * cx, np.clip(Y, 0, 1) * cy
    ix, iy = fx.astype(int), fy.astype(int)
    tx, ty = fx - ix, fy - iy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    return (G[iy, ix] * (1 - tx) * (1 - ty) + G[iy, ix + 1] * tx * (1 - ty)
            + G[iy + 1, ix] * (1 - tx) * ty + G[iy + 1, ix + 1] * tx * ty)


def _mix(a, b, t):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a + (b - a) * np.asarray(t)[..., None]


def _ell(cx, cy, rx, ry, n=24):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def _shape(name, rng):
    """List of (part, polygon [n, 2]) of one instance in its local frame, back to front."""
    r = rng.uniform
    if name == "boat":
        d = r(0.3, 0.5)
        return [("sail", np.array([[0.05, -1.1], [0.05, -0.05], [r(0.55, 0.85), -0.05]])),
                ("mast", _rect(-0.03, -1.15, 0.04, 0.05)), ("hull", np.array([[-1, 0], [1, 0], [0.7, d], [-0.75, d]]))]
    if name == "plane":
        w = r(0.8, 1.0)
        wing = np.array([[0.2, 0], [-0.25, -w], [-0.45, -w], [-0.25, 0]])
        tail = np.array([[-0.7, 0], [-0.92, -0.35], [-1.0, -0.35], [-0.92, 0]])
        return [(part, p * s) for part, p in (("wing", wing), ("tail", tail)) for s in ((1, 1), (1, -1))] + \
               [("body", _ell(0, 0, 1, 0.13))]
    if name == "car":
        return [("body", np.array([[-0.55, -0.1], [0.4, -0.1], [0.2, -0.5], [-0.4, -0.5]])),
                ("body", np.array([[-1, -0.05], [0.75, -0.1], [1, 0.05], [1, 0.35], [-1, 0.35]])),
                ("glass", np.array([[-0.46, -0.15], [0.3, -0.15], [0.15, -0.43], [-0.35, -0.43]]))] + \
               [(p, _ell(x, 0.35, rr, rr)) for x in (-0.55, 0.55) for p, rr in (("tyre", 0.22), ("hub", 0.09))]
    if name == "train":
        n = int(rng.integers(3, 6))
        xs = np.linspace(-0.85, 0.55, n + 1)
        return [("body", np.array([[-1, -0.4], [0.8, -0.4], [1, -0.05], [1, 0.25], [-1, 0.25]])),
                ("stripe", _rect(-1, 0.06, 1, 0.14)),
                ("window", np.array([[0.8, -0.34], [0.93, -0.1], [0.8, -0.1]]))] + \
               [("window", _rect(a + 0.04, -0.3, b - 0.04, -0.1)) for a, b in zip(xs[:-1], xs[1:])] + \
               [("wheel", _ell(x, 0.27, 0.1, 0.1)) for x in np.linspace(-0.8, 0.8, 5)]
    if name == "cow":
        return [("body", _rect(x, 0.1, x + 0.13, r(0.6, 0.7))) for x in (-0.58, -0.36, 0.3, 0.48)] + \
               [("body", _rect(-0.74, -0.1, -0.69, 0.4)), ("body", _ell(0, 0, 0.72, 0.33)),
                ("body", _ell(0.8, -0.22, 0.22, 0.17))]
    if name == "sofa":
        return [("body", _rect(-0.85, -r(0.45, 0.6), 0.85, 0.05)), ("body", _rect(-0.9, 0.0, 0.9, 0.35)),
                ("body", _rect(-1, -0.25, -0.78, 0.35)), ("body", _rect(0.78, -0.25, 1, 0.35)),
                ("leg", _rect(-0.9, 0.35, -0.8, 0.45)), ("leg", _rect(0.8, 0.35, 0.9, 0.45))]
    if name == "camel":
        hump = [("body", _ell(x, -0.28, 0.22, r(0.15, 0.22))) for x in ((-0.1,) if r() < 0.5 else (-0.28, 0.1))]
        return [("body", _rect(x, 0.1, x + 0.1, 0.85)) for x in (-0.48, -0.3, 0.25, 0.42)] + hump + \
               [("body", _ell(0, 0, 0.58, 0.27)),
                ("body", np.array([[0.38, -0.1], [0.58, 0.05], [0.9, -0.48], [0.75, -0.56]])),
                ("body", _ell(0.88, -0.55, 0.17, 0.1))]
    if name == "bird":
        return [("wing", np.array([[-0.5, -0.05], [-1, -0.22], [-1, 0.15], [-0.5, 0.1]])),
                ("body", _ell(0, 0, 0.6, 0.3)),
                ("body", _ell(0.55, -0.22, 0.25, 0.22)), ("beak", np.array([[0.74, -0.3], [1.0, -0.2], [0.74, -0.12]])),
                ("wing", _ell(-0.12, -0.04, 0.38, 0.15)), ("eye", _ell(0.62, -0.27, 0.05, 0.05, 8))]
    raise ValueError(name)


def _part_colour(style, base, u, v, rng):
    """Colour [H, W, 3] of a part at local coordinates u, v."""
    base = np.asarray(base, float) * rng.uniform(0.85, 1.15, 3)
    U, V = (u + 1.2) / 2.4, (v + 1.2) / 2.4
    if style == "planks":
        f = 1 - 0.25 * ((v * 7) % 1 < 0.18)
    elif style == "metal":
        f = 1.05 - 0.2 * (V - 0.3)
    elif style == "fabric":
        f = (1 + 0.08 * np.sin(40 * u) * np.sin(40 * v)) * (1 - 0.3 * ((u * 2.5 + 0.5) % 1 < 0.05))
    elif style == "blotch":
        return _mix(base, (25, 25, 25), _smooth(rng, 6, U, V) > 0.4)
    elif style == "fur":
        f = 0.85 + 0.3 * _smooth(rng, 8, U, V)
    elif style == "feather":
        f = 1 + 0.12 * np.sin(30 * u + 12 * v)
    else:
        f = 1 - 0.08 * v
    return base * np.asarray(f, float)[..., None]


def _background(name, rng, X, Y, lo, hi):
    """Texture [H, W, 3] of background `name` over the whole image; region rows lie in [lo, hi]."""
    n = lambda cells: _smooth(rng, cells, X, Y)  # noqa: E731
    j = rng.uniform(0.9, 1.1, 3)
    grain = lambda sd: rng.normal(0, sd, X.shape)[..., None]  # noqa: E731
    mid, h = (lo + hi) / 2, hi - lo
    if name == "sky":
        col = _mix(np.array((95, 145, 225)) * j, (185, 210, 245), np.clip((Y - lo) / max(h, 1e-3), 0, 1))
        col = _mix(col, (248, 248, 252), np.clip((0.6 * n(3) + 0.4 * n(7) - rng.uniform(0.48, 0.62)) * 5, 0, 1))
    elif name == "water":
        w = np.sin(2 * np.pi * (Y * rng.uniform(14, 20) + 1.5 * n(4)))
        col = np.array((25, 75, 150)) * j + (30 * w * (0.5 + n(5)))[..., None]
        col = np.where(((w > 0.85) & (n(9) > 0.6))[..., None], col + 70, col)
    elif name == "grass":
        blades = 0.65 + 0.55 * _smooth(rng, (3, 48), X, Y)  # streaks: fine across, coarse along
        col = np.array((60, 140, 45)) * j * (blades * (0.8 + 0.3 * n(4)))[..., None]
    elif name == "road":
        col = np.array((82, 82, 88)) * j + grain(10)
        y = mid + rng.uniform(-0.2, 0.2) * h
        lane = (np.abs(Y - y) < 0.018) & ((X * 5 + rng.random()) % 1 < 0.55)
        col = np.where(lane[..., None], (235, 230, 215) if rng.random() < 0.6 else (230, 200, 60), col)
    elif name == "rails":
        col = np.array((120, 110, 100)) * j + grain(18) + (30 * n(10))[..., None]
        g = min(0.2, 0.55 * h)
        sleeper = (np.abs(Y - mid) < g / 2 + 0.05) & ((X * 9 + rng.random()) % 1 < 0.32)
        col = np.where(sleeper[..., None], (95, 65, 40), col)
        rail = (np.abs(Y - mid + g / 2) < 0.016) | (np.abs(Y - mid - g / 2) < 0.016)
        col = np.where(rail[..., None], (200, 200, 212), col)
    elif name == "indoor":
        col = np.array((215, 195, 160)) * j * (1 - 0.07 * (np.sin(2 * np.pi * X * 12) > 0.3))[..., None]
        planks = 0.85 + 0.3 * _smooth(rng, (3, 24), X, Y) - 0.25 * ((Y * 30) % 1 < 0.12)
        floor = np.array((150, 100, 60)) * planks[..., None]
        col = np.where((Y > lo + rng.uniform(0.55, 0.8) * h)[..., None], floor, col)
    elif name == "sand":
        dunes = 14 * np.sin(2 * np.pi * (X * 3 + Y * 8 + 2 * n(3)))
        col = np.array((215, 185, 125)) * j + dunes[..., None] + grain(7)
    elif name == "foliage":
        col = _mix(np.array((20, 60, 25)) * j, (95, 165, 60), np.clip(0.75 * n(14) + 0.45 * n(28) - 0.2, 0, 1))
    elif name == "snow":
        col = np.array((236, 240, 248)) - (np.array((20, 14, 4)) * n(3)[..., None]) + grain(3)
    elif name == "rock":
        col = np.array((125, 115, 105)) * j * (0.65 + 0.6 * n(6))[..., None] + grain(9)
        col = np.where((np.abs(n(9) - 0.5) < 0.025)[..., None], col * 0.5, col)
    else:
        raise ValueError(name)
    return col


def _finish(rng, img, S):
    """Camera effects: blur, colour jitter, pixel noise. float [S, S, 3] -> uint8."""
    img = np.clip(img, 0, 255)
    if rng.random() < 0.5:
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * S / 96)), float)
    m = img.mean()
    img = (img - m) * rng.uniform(0.85, 1.15) + m * rng.uniform(0.85, 1.15)
    img = img * rng.uniform(0.95, 1.05, 3) + rng.normal(0, rng.uniform(2, 7), img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _regions(rng, S, bgs):
    """Region map [S, S] (index into bgs, sorted top to bottom) and each region's row range."""
    bgs = sorted(bgs, key=BACKGROUNDS.index)
    X, Y = np.meshgrid((np.arange(S) + 0.5) / S, (np.arange(S) + 0.5) / S)
    if len(bgs) == 1:
        return bgs, np.zeros((S, S), int), [(0.0, 1.0)], X, Y
    cut = rng.uniform(0.35, 0.65)
    edge = cut + rng.uniform(0, 0.03) * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * X + rng.random()))
    return bgs, (Y >= edge).astype(int), [(0.0, cut), (cut, 1.0)], X, Y


def background_image(rng, S, bg):
    """A background-only scene (no object): CLIP pretraining captions and the bias measurement."""
    _, _, _, X, Y = _regions(rng, S, [bg])
    return _finish(rng, _background(bg, rng, X, Y, 0.0, 1.0), S)


def _shift_any(m, r):
    """Binary dilation of m by a (2r+1)^2 square."""
    p = np.pad(m, r)
    out = np.zeros_like(m)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return out


def make_image(rng, S, cooccur, multi):
    """One scene: 1-2 classes, 1-3 objects, each on its home background with probability `cooccur`.
    Returns (image uint8 [S, S, 3], mask uint8 [S, S], info dict for toy_meta.json)."""
    K = len(CLASSES)
    classes = [int(c) for c in rng.choice(K, 2 if rng.random() < multi else 1, replace=False)]
    counts = [int(rng.choice(3, p=[0.6, 0.3, 0.1])) + 1] if len(classes) == 1 else [1, 1 + (rng.random() < 0.2)]
    bg_of = {}
    for c in classes:
        home = HOME[NAMES[c]]
        bg_of[c] = home if rng.random() < cooccur else str(rng.choice([b for b in BACKGROUNDS if b != home]))
    need = sorted(set(bg_of.values()), key=BACKGROUNDS.index)
    if len(need) == 1 and rng.random() < 0.35:  # a second region, from the neutral backgrounds (nobody's home)
        need.append(str(rng.choice([b for b in BACKGROUNDS if b not in need and b not in HOME.values()])))
    bgs, R, rows, X, Y = _regions(rng, S, need)
    img = np.zeros((S, S, 3))
    for i, b in enumerate(bgs):
        img = np.where((R == i)[..., None], _background(b, rng, X, Y, *rows[i]), img)
    objs = [c for c, k in zip(classes, counts) for _ in range(k)]
    shrink = [1.0, 0.85, 0.72][len(objs) - 1]
    min_px, band_r = max(8, int(0.003 * S * S)), max(1, S // 128)
    for attempt in range(30):
        inst, lab, boxes, canvas = np.zeros((S, S), np.uint8), np.zeros((S, S), np.uint8), [], img.copy()
        for j, c in enumerate(objs):
            name, home, (lo_len, hi_len), rot = CLASSES[c]
            parts = _shape(name, rng)
            s = rng.uniform(lo_len, hi_len) * shrink * S / 2
            a, flip = math.radians(rng.uniform(-rot, rot)), (-1.0 if rng.random() < 0.5 else 1.0)
            Rm = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            pts = np.concatenate([p for _, p in parts]) * [flip, 1] @ Rm.T
            lo_r, hi_r = rows[bgs.index(bg_of[c])]
            s = s * min(1.0, max(0.6, 0.95 * (hi_r - lo_r) * S / (np.ptp(pts[:, 1]) * s)))
            (x0, y0), (x1, y1) = pts.min(0) * s, pts.max(0) * s
            for _ in range(15):  # keep the object inside its region and apart from the others
                cx = rng.uniform(-x0 - 0.1 * (x1 - x0), S - x1 + 0.1 * (x1 - x0))
                ya, yb = lo_r * S - y0 - 0.15 * (y1 - y0), hi_r * S - y1 + 0.15 * (y1 - y0)
                cy = rng.uniform(ya, yb) if ya < yb else (ya + yb) / 2
                box = (cx + x0, cy + y0, cx + x1, cy + y1)
                if all(_overlap(box, b) < 0.25 for b in boxes):
                    break
            boxes.append(box)
            part_map = Image.new("L", (S, S))
            draw = ImageDraw.Draw(part_map)
            for k, (_, p) in enumerate(parts):
                q = (p * [flip, 1]) @ Rm.T * s + [cx, cy] - 0.5
                draw.polygon([tuple(v) for v in q], fill=k + 1)
            P = np.asarray(part_map)
            d = np.stack([X * S - 0.5 - cx, Y * S - 0.5 - cy], -1) @ Rm / s  # local frame (rotation inverse)
            u, v = d[..., 0] * flip, d[..., 1]
            for k, (part, _) in enumerate(parts):
                sel = P == k + 1
                if sel.any():
                    base, style = STYLE[name][part]
                    canvas[sel] = _part_colour(style, base, u, v, rng)[sel]
            inst[P > 0], lab[P > 0] = j + 1, c + 1
        pad, band = np.pad(inst, 1, mode="edge"), np.zeros((S, S), bool)
        for dy in range(3):  # pixels next to an instance boundary, on both sides (VOC's ignore band)
            for dx in range(3):
                band |= pad[dy:dy + S, dx:dx + S] != inst
        band = _shift_any(band, band_r - 1) if band_r > 1 else band
        if all(((inst == j + 1) & ~band).sum() >= min_px for j in range(len(objs))):
            break
    mask = np.where(band, 255, lab).astype(np.uint8)
    ring_r, objects = max(2, S // 24), []
    for j, c in enumerate(objs):
        if not ((inst == j + 1) & ~band).any():  # hidden behind the others (30 placements failed): unlabelled
            continue
        ring = _shift_any(inst == j + 1, ring_r) & (inst == 0)
        surround = bgs[int(np.bincount(R[ring], minlength=len(bgs)).argmax())] if ring.any() else bg_of[c]
        objects.append({"cls": NAMES[c], "bg": bg_of[c], "surround": surround})
    return _finish(rng, canvas, S), mask, {"regions": bgs, "objects": objects}


def _overlap(a, b):
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return max(0, iw) * max(0, ih) / max(area, 1e-6)


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------
def dataset_args(n_train, n_val, n_train_subset, size, seed, cooccur, multi):
    """The generation args a world stores in toy_meta.json ("args"): what makes it, and what reusing it checks."""
    return dict(version=GEN_VERSION, n_train=n_train, n_val=n_val, n_train_subset=min(n_train_subset, n_train),
                size=size, seed=seed, cooccur=cooccur, multi=multi)


def world_is_complete(meta, args):
    """Whether toy_meta.json's dict `meta` is a finished world made with generation args `args`."""
    return bool(meta) and bool(meta.get("complete")) and meta.get("args") == args


def generate_dataset(out, n_train, n_val, n_train_subset, size, seed, cooccur, multi, force=False, quiet=False):
    """Write the toy dataset to `out` (skipped if toy_meta.json says it is complete with these args; the
    defaults of the world's flags are WORLD_FLAGS, below). Returns the toy_meta.json dict."""
    args = dataset_args(n_train, n_val, n_train_subset, size, seed, cooccur, multi)
    meta_path = os.path.join(out, "toy_meta.json")
    old = runtime.read_json(meta_path)
    if not force and world_is_complete(old, args):
        write_clusters(out)  # a world made before the cluster file existed gets it too
        return old
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an interrupted run must not look complete
    splits = {"train_aug": [f"toy_{i:06d}" for i in range(n_train)],
              "val": [f"toy_{n_train + i:06d}" for i in range(n_val)]}
    splits["train"] = splits["train_aug"][:args["n_train_subset"]]
    images = {}
    for stream, split in enumerate(["train_aug", "val"]):
        for i, image_id in enumerate(splits[split]):
            img, mask, info = make_image(np.random.default_rng([seed, stream, i]), size, cooccur, multi)
            with runtime.atomic_path(datasets.image_path(out, image_id)) as tmp:
                Image.fromarray(img).save(tmp, format="JPEG", quality=95)
            datasets.save_mask(os.path.join(out, "SegmentationClass", f"{image_id}.png"), mask)
            images[image_id] = {"split": split, **info}
            if not quiet and (len(images) % 500 == 0 or len(images) == n_train + n_val):
                print(f"  generated {len(images)}/{n_train + n_val} images", flush=True)
    keep = {f"{i}.{e}" for i in images for e in ("jpg", "png")}
    for folder in ("JPEGImages", "SegmentationClass"):  # images of an earlier, larger toy set
        for f in os.listdir(os.path.join(out, folder)):
            if f.startswith("toy_") and f not in keep:
                os.remove(os.path.join(out, folder, f))
    for split, ids in splits.items():
        path = os.path.join(out, "ImageSets", "Segmentation", f"{split}.txt")
        with runtime.atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write("".join(i + "\n" for i in ids))
    with runtime.atomic_path(os.path.join(out, "class_names.txt")) as tmp, open(tmp, "w") as f:
        f.write("".join(n + "\n" for n in NAMES))
    write_clusters(out)
    labels = datasets.derive_labels(out, sorted(images))  # the loaders derive them too: no label file here
    if os.path.exists(os.path.join(out, "cls_labels.json")):  # an older version's, which nothing reads
        os.remove(os.path.join(out, "cls_labels.json"))
    meta = {"args": args, "class_names": NAMES, "home": HOME, "backgrounds": BACKGROUNDS, "images": images,
            "summary": dataset_summary(images, labels, splits), "complete": True}
    with runtime.atomic_path(meta_path) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=0)
    return meta


def write_clusters(out):
    """OUT/clusters.json: the repository's semples/clusters/toy.json (category clusters of the toy classes, for
    train_cam.py --clusters), checked against the classes. Written only when it differs, so that a rerun
    leaves the world's files (and run.sh's key of them) as they were."""
    clusters = datasets.read_clusters(os.path.join(runtime.REPO, "semples", "clusters", "toy.json"), NAMES,
                                     "semples/clusters/toy.json")
    path = os.path.join(out, "clusters.json")
    if runtime.read_json(path) != clusters:
        with runtime.atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(clusters, f, indent=1)


def dataset_summary(images, labels, splits):
    """Counts per split, per-class image counts, measured co-occurrence rate and multi-class share."""
    out = {}
    for split, ids in splits.items():
        objs = [o for i in ids for o in images[i]["objects"]]
        out[split] = {"images": len(ids), "objects": len(objs),
                      "per_class": {n: sum(k + 1 in labels[i] for i in ids) for k, n in enumerate(NAMES)},
                      "cooccurrence": float(np.mean([o["surround"] == HOME[o["cls"]] for o in objs])),
                      "multi_class": float(np.mean([len(labels[i]) > 1 for i in ids]))}
    return out


# ----------------------------------------------------------------------------------------------
# The tiny CLIP
# ----------------------------------------------------------------------------------------------
def caption(names, template):
    """'a photo of a boat and a cow.' (template 'a photo of a {}.') or 'a photo of boat and cow.'"""
    article = "a " if "of a {}" in template else ""
    return template.format((" and " + article).join(names))


def _to_clip(x, res):
    """uint8 [B, 3, H, W] -> normalised float at CLIP's resolution (bilinear, as the stages resize)."""
    return clip_normalise(F.interpolate(x.float() / 255, size=(res, res), mode="bilinear", align_corners=False))


def _random_crops(x, res, g):
    """Random-resized crops (area 60-100%, aspect 3/4-4/3) and horizontal flips, uint8 in, normalised out."""
    B, S = x.shape[0], x.shape[-1]
    area, ratio = 0.6 + 0.4 * torch.rand(B, generator=g), torch.exp((torch.rand(B, generator=g) - 0.5) * 0.575)
    w, h = (S * torch.sqrt(area * ratio)).clamp(max=S), (S * torch.sqrt(area / ratio)).clamp(max=S)
    x0, y0 = torch.rand(B, generator=g) * (S - w), torch.rand(B, generator=g) * (S - h)
    boxes = torch.stack([torch.arange(B).float(), x0, y0, x0 + w, y0 + h], 1)
    out = roi_align(x.float() / 255, boxes, (res, res), sampling_ratio=1, aligned=True)
    out = torch.where((torch.rand(B, generator=g) < 0.5).view(B, 1, 1, 1), out.flip(-1), out)
    return clip_normalise(out)


def _backgrounds(specs, S):
    """uint8 [N, 3, S, S] background-only scenes, one per (background name, rng seed sequence)."""
    return torch.stack([torch.from_numpy(background_image(np.random.default_rng(s), S, b)).permute(2, 0, 1)
                        for b, s in specs])


def _load_split(root, split):
    ids = datasets.read_ids(root, split)
    x = np.stack([datasets.read_image(datasets.image_path(root, i)) for i in ids])
    return ids, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate_clip(model, root, seed=0, n_bg=24):
    """Zero-shot accuracy on single-object val images, and the co-occurrence bias per class:
    sim(text_c, c's home background alone) - sim(text_c, other backgrounds alone)."""
    model.eval()
    res, K = model.visual.input_resolution, len(NAMES)
    ids, x = _load_split(root, "val")
    y = datasets.load_labels(root, ids, K)
    single = torch.from_numpy(y.sum(1) == 1)
    v = F.normalize(model.encode_image(_to_clip(x[single], res)), dim=-1)
    S = x.shape[-1]
    bg = _backgrounds([(name, [seed, 3, b, i]) for b, name in enumerate(BACKGROUNDS) for i in range(n_bg)], S)
    vb = F.normalize(model.encode_image(_to_clip(bg, res)), dim=-1).view(len(BACKGROUNDS), n_bg, -1).mean(1)
    out = {}
    for t, template in enumerate(TEMPLATES):
        u = F.normalize(model.encode_text(clip.tokenize([template.format(n) for n in NAMES],
                                                        context_length=model.context_length)), dim=-1)
        acc = float(((v @ u.T).argmax(1) == torch.from_numpy(y[single.numpy()].argmax(1))).float().mean())
        s = u @ vb.T  # [K classes, n backgrounds], mean cosine
        gap = {n: float(s[k, BACKGROUNDS.index(HOME[n])] - s[k, [b != HOME[n] for b in BACKGROUNDS]].mean())
               for k, n in enumerate(NAMES)}
        out[f"template{t}"] = {"template": template, "zero_shot_acc": acc, "bias": gap,
                               "bias_mean": float(np.mean(list(gap.values())))}
    out["n_single_val"] = int(single.sum())
    # The object alone, as stage (a)'s M * X looks to CLIP: the ground-truth mask resized to CLIP's input
    # (bilinear, so soft edges), the rest filled with the mean colour (the pipeline's default) or black.
    fg = torch.from_numpy(np.stack([datasets.read_mask(os.path.join(datasets.mask_dir(root), f"{i}.png"))
                                    for i, s in zip(ids, single.tolist()) if s]) > 0).float()[:, None]
    m = F.interpolate(fg, size=(res, res), mode="bilinear", align_corners=False)
    img = F.interpolate(x[single].float() / 255, size=(res, res), mode="bilinear", align_corners=False)
    truth = torch.from_numpy(y[single.numpy()].argmax(1))
    for fill in FILLS:
        f = fill_colour(fill).view(1, 3, 1, 1)
        vf = F.normalize(model.encode_image(clip_normalise(m * img + (1 - m) * f)), dim=-1)
        out[f"object_alone_acc_{fill}"] = float(((vf @ u.T).argmax(1) == truth).float().mean())
        if fill == "mean":  # the object alone must match its class text far better than its backdrop alone does
            obj = torch.stack([(vf[truth == k] @ u[k]).mean() for k in range(K)])
            home = torch.stack([s[k, BACKGROUNDS.index(HOME[n])] for k, n in enumerate(NAMES)])
            out["object_over_home"] = {n: float(obj[k] - home[k]) for k, n in enumerate(NAMES)}
            out["object_over_home_mean"] = float((obj - home).mean())
    # The background alone, as stage (b) learns the prompts from it: the object cut out (GT mask, mean fill).
    # Among all 18 words (classes and sceneries, the stages' template), the image's own scenery should win.
    images = runtime.read_json(os.path.join(root, "toy_meta.json"))["images"]
    regions = [images[i]["regions"] for i, s in zip(ids, single.tolist()) if s]
    f = fill_colour("mean").view(1, 3, 1, 1)
    vb = F.normalize(model.encode_image(clip_normalise((1 - m) * img + m * f)), dim=-1)
    words = NAMES + BACKGROUNDS
    uw = F.normalize(model.encode_text(clip.tokenize([TEMPLATES[-1].format(w) for w in words],
                                                     context_length=model.context_length)), dim=-1)
    top = (vb @ uw.T).argmax(1).tolist()
    out["scenery_behind_acc"] = float(np.mean([words[t] in r for t, r in zip(top, regions)]))
    out["scenery_behind_class_top1"] = float(np.mean([t == int(c) for t, c in zip(top, truth)]))
    return out


def _clip_meta_ok(path, want):
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
    except Exception:
        return None
    same = all(meta.get(k) == v for k, v in want.items())
    return meta if same else None


def _cutouts(seed, n, S, g):
    """Objects on plain backdrops, as web data shows real CLIP (product shots, studio photos): `n` fresh
    scenes (a seed stream of their own, never in the dataset) whose background is replaced by one plain
    colour: CLIP's mean colour, black, white, grey or a random one, with edges softened by 0-2 px.
    Returns uint8 [n, 3, S, S] and each scene's class indices."""
    imgs, masks, classes = [], [], []
    for i in range(n):
        # Drawn as every world's were before --cooccur's default became 0.95: the background is replaced anyway,
        # and a fixed draw keeps the tiny CLIP of a world independent of the world's --cooccur and --multi.
        img, mask, _ = make_image(np.random.default_rng([seed, 5, i]), S, cooccur=0.8, multi=0.25)
        imgs.append(torch.from_numpy(img).permute(2, 0, 1))
        masks.append(torch.from_numpy(((mask >= 1) & (mask <= len(NAMES))).astype(np.float32)))
        classes.append(sorted({int(v) - 1 for v in np.unique(mask) if 1 <= v <= len(NAMES)}))
    x, m = torch.stack(imgs).float(), torch.stack(masks)[:, None]
    r = torch.randint(3, (n,), generator=g)
    for k in (1, 2):  # soft edges: a box blur of radius k on a third of the masks each
        m[r == k] = F.avg_pool2d(m[r == k], 2 * k + 1, 1, k, count_include_pad=False)
    kind = torch.randint(3, (n,), generator=g)
    fixed = torch.tensor([[0.0, 0, 0], [255, 255, 255], [128, 128, 128]])
    fill = torch.where((kind == 0)[:, None], 255 * fill_colour("mean"),
                       torch.where((kind == 1)[:, None], fixed[torch.randint(3, (n,), generator=g)],
                                   255 * torch.rand(n, 3, generator=g)))
    return (m * x + (1 - m) * fill.view(n, 3, 1, 1)).round().to(torch.uint8), classes, m, fill


def _holed(scenes, masks, fills, g):
    """Scenery with a flat hole where an object was cut out, as the background images of stages (a)-(c),
    (1 - M) * X, look to CLIP: each scene gets a random cut-out outline (any class), widened by 0-4 px on
    half of them (CAM masks are blobs), filled like the cut-outs. Real CLIP still names such an image by
    its scenery; a CLIP that never saw one reads the flat hole as "a cut-out object" and names the object
    (measured on the toy CLIP without them: water with a boat-shaped hole matched "boat", rank 1 of 18,
    and "water" ranked 11th)."""
    n = len(scenes)
    i = torch.randint(len(masks), (n,), generator=g)
    m = masks[i].clone()
    r = torch.randint(5, (n,), generator=g) * (torch.rand(n, generator=g) < 0.5)
    for k in range(1, 5):
        m[r == k] = F.max_pool2d(m[r == k], 2 * k + 1, 1, k)
    return ((1 - m) * scenes.float() + m * fills[i].view(n, 3, 1, 1)).round().to(torch.uint8)


def _fix_geometry(model, rho, kappa, seed):
    """Real CLIP's feature geometry, exactly (Liang et al., "Mind the Gap", NeurIPS 2022: each modality's
    features lie in a narrow cone of their own, with a gap between the two): every text feature is
    sqrt(rho) d_t + sqrt(1 - rho) u' and every image feature sqrt(rho) d_i + sqrt(1 - rho) v', with u', v' unit
    vectors orthogonal to the fixed shared directions d_t, d_i, and d_i . d_t = kappa. So text-text cosines lie
    in [2 rho - 1, 1], image-text ones in rho kappa + (1 - rho) [-1, 1]: at rho 0.75, kappa 0.2, matching
    image-text pairs near 0.3 and others near 0.16, as OpenAI's ViT-B/32 (the plain tiny CLIP: -0.5 to 0.9, so
    sim()'s clamp at 1e-4 can silence a loss term; docs/method.md, "The toy presets").
    How: each tower ends in LayerNorm then a projection; the LayerNorm's gain is fixed at 1 and its bias at a
    constant c in every channel (its normalised output has zero channel mean, so it is orthogonal to that
    bias and has norm sqrt(width)), and the projection is a fixed orthogonal matrix; none of them trains.
    c = sqrt(rho / (1 - rho)) sets the shares; the image projection is the text one rotated so that the two
    shared directions meet at kappa. Needs the towers' widths equal to the embedding size."""
    W, D = model.text_projection.shape
    if model.visual.proj.shape != (W, D) or W != D:
        raise ValueError(f"--cone needs vision width = text width = embed dim, got {tuple(model.visual.proj.shape)} "
                         f"and {(W, D)}")
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(W, D, generator=g))
    d_t = Q.sum(0) / math.sqrt(W)  # where the constant bias lands: ones @ Q, unit length
    e = torch.randn(D, generator=g)
    e = F.normalize(e - (e @ d_t) * d_t, dim=0)
    s = math.sqrt(1 - kappa ** 2)  # rotation in the (d_t, e) plane taking d_t to kappa d_t + s e
    H = (torch.eye(D) + (kappa - 1) * (torch.outer(d_t, d_t) + torch.outer(e, e))
         + s * (torch.outer(d_t, e) - torch.outer(e, d_t)))
    with torch.no_grad():
        towers = ((model.ln_final, model.text_projection, Q), (model.visual.ln_post, model.visual.proj, Q @ H))
        for ln, proj, rot in towers:
            ln.weight.fill_(1.0)
            ln.bias.fill_(math.sqrt(rho / (1 - rho)))
            proj.copy_(rot / math.sqrt(W))
            for p in (ln.weight, ln.bias, proj):
                p.requires_grad_(False)


def pretrain_clip(root, out_path, steps=900, batch_size=128, lr=1e-3, bg_caption_frac=0.0, plain_frac=0.2,
                  scene_frac=0.25, scene_hole_frac=0.5, bg_pool=48, cut_pool=512, seed=0, config=None, evaluate=True,
                  force=False, log_every=100, quiet=False, threads=None, cone=0.0, gap_cos=0.2):
    """Contrastive pretraining (symmetric InfoNCE; duplicate captions in a batch are all positives). A batch
    mixes what web data teaches real CLIP:
      - train_aug images captioned with the names of their objects ("a photo of a boat and a cow.");
      - `bg_caption_frac` (default 0): a class's home background alone, captioned with the class, an
        explicit extra bias. Without it the bias comes from co-occurrence alone, as in web data;
        measured with 0.1: the class text matched the home background alone as well as the object
        alone (margin +0.007, boat -0.09), and stage (a) learned to put boat masks on the water;
      - `plain_frac`: objects on plain backdrops (_cutouts), captioned with their classes, so that CLIP
        recognises an object cut out by a mask, as real CLIP does;
      - `scene_frac`: scenery alone captioned as scenery ("a photo of water."), so background words mean
        something (the learned prompts' nearest words); `scene_hole_frac` of those scenes show a flat hole
        where an object was cut out (_holed), as the background images (1 - M) * X of the method do.
    Saves {"state_dict", "meta"} atomically; returns meta (with "loss_history"). Skipped if `out_path`
    holds a model trained with the same settings. `threads`: torch CPU threads while training (restored
    after); None keeps the current setting. `cone` > 0: real CLIP's feature geometry (_fix_geometry), an
    experiment, off by default, with `gap_cos` the cosine of the two modalities' shared directions."""
    config = {**CLIP_CONFIG, **(config or {})}
    dmeta = runtime.read_json(os.path.join(root, "toy_meta.json")) or {}
    want = {"config": config, "dataset_args": dmeta.get("args"), "version": GEN_VERSION,
            "pretrain_args": dict(steps=steps, batch_size=batch_size, lr=lr, bg_caption_frac=bg_caption_frac,
                                  plain_frac=plain_frac, scene_frac=scene_frac, scene_hole_frac=scene_hole_frac,
                                  bg_pool=bg_pool, cut_pool=cut_pool, seed=seed,
                                  **({"cone": cone, "gap_cos": gap_cos} if cone else {}))}
    old = None if force or not os.path.exists(out_path) else _clip_meta_ok(out_path, want)
    if old is not None:
        return old
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads or prev_threads)
    try:
        runtime.seed_everything(seed)
        g = torch.Generator().manual_seed(seed)
        model = clip.model.CLIP(**config)
        if cone:
            _fix_geometry(model, cone, gap_cos, seed)
        ids, x = _load_split(root, "train_aug")
        K = len(NAMES)
        y = datasets.load_labels(root, ids, K)
        S, res = x.shape[-1], config["image_resolution"]
        # Every sample source as (uint8 images [N, 3, S, S], caption words of each image).
        full = (x, [[NAMES[k] for k in np.flatnonzero(row)] for row in y])
        home = (_backgrounds([(HOME[n], [seed, 2, c, i]) for c, n in enumerate(NAMES) for i in range(bg_pool)], S),
                [[n] for n in NAMES for _ in range(bg_pool)])
        cut_x, cut_c, cut_m, cut_fill = _cutouts(seed, cut_pool, S, g)
        plain = (cut_x, [[NAMES[k] for k in c] for c in cut_c])
        scenes = _backgrounds([(b, [seed, 4, bi, i]) for bi, b in enumerate(BACKGROUNDS) for i in range(bg_pool)], S)
        holed = torch.rand(len(scenes), generator=g) < scene_hole_frac
        scenes[holed] = _holed(scenes[holed], cut_m, cut_fill, g)
        scene = (scenes, [[b] for b in BACKGROUNDS for _ in range(bg_pool)])
        n_home, n_plain, n_scene = (int(round(batch_size * f)) for f in (bg_caption_frac, plain_frac, scene_frac))
        mix = [(full, batch_size - n_home - n_plain - n_scene), (home, n_home), (plain, n_plain), (scene, n_scene)]
        # Only the caption words' rows of the 49408-row token embedding ever get a gradient: train those rows
        # as a small parameter (AdamW over the full table would cost more than the model) and write them back.
        vocab = sorted({t for c in NAMES + BACKGROUNDS for tm in TEMPLATES
                        for t in clip.tokenize(caption([c, c], tm), 64)[0].tolist()})
        remap = torch.zeros(config["vocab_size"], dtype=torch.long)
        remap[vocab] = torch.arange(len(vocab))
        rows = torch.nn.Parameter(model.token_embedding.weight.detach()[vocab].clone())
        model.token_embedding.weight.requires_grad_(False)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + [("rows", rows)]
        decay = [p for n, p in named if p.ndim >= 2 and n != "rows" and "embedding" not in n]
        rest = [p for n, p in named if not (p.ndim >= 2 and n != "rows" and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.98), eps=1e-6)
        tok_cache, history, t0 = {}, [], time.time()
        model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = runtime.cosine_lr(lr, step, steps, warmup_steps=max(1, steps // 20))
            batch, words = [], []
            for (images, names), n in mix:
                if n:
                    i = torch.randint(len(images), (n,), generator=g)
                    batch.append(images[i])
                    words += [names[j] for j in i.tolist()]
            imgs = _random_crops(torch.cat(batch), res, g)
            tmpl = torch.randint(len(TEMPLATES), (batch_size,), generator=g)
            caps = [caption([w[j] for j in torch.randperm(len(w), generator=g).tolist()], TEMPLATES[tmpl[b]])
                    for b, w in enumerate(words)]  # names in random order
            uniq = sorted(set(caps))
            cap_idx = torch.tensor([uniq.index(c) for c in caps])
            for c in uniq:
                if c not in tok_cache:
                    tok_cache[c] = clip.tokenize([c], context_length=config["context_length"])[0]
            tok = torch.stack([tok_cache[c] for c in uniq])
            eot = tok.argmax(-1)
            tok = tok[:, : int(eot.max()) + 1]  # causal text encoder: the padding after EOT changes nothing
            vi = F.normalize(model.encode_image(imgs), dim=-1)
            ut = F.normalize(model.encode_token_embeddings(rows[remap[tok]], eot), dim=-1)
            logits = model.logit_scale.exp() * vi @ ut.T  # [B, unique captions]
            pos = (cap_idx[None, :] == torch.arange(len(uniq))[:, None]).float()  # [U, B]
            loss = (F.cross_entropy(logits, cap_idx) + F.cross_entropy(logits.T, pos / pos.sum(1, keepdim=True))) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            history.append(loss.item())
            if not quiet and log_every and (step % log_every == 0 or step == steps - 1):
                print(f"clip step {step:5d}/{steps} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.1f} "
                      f"{time.time() - t0:.0f}s", flush=True)
        with torch.no_grad():
            model.token_embedding.weight[vocab] = rows
        model.token_embedding.weight.requires_grad_(True)
        meta = {**want, "class_names": NAMES, "seed": seed, "templates": TEMPLATES, "template": TEMPLATES[0],
                "home": HOME, "train_seconds": time.time() - t0, "final_loss": history[-1],
                "loss_history": history[::10]}
        if evaluate:
            meta["eval"] = evaluate_clip(model, root, seed)
    finally:
        torch.set_num_threads(prev_threads)
    runtime.save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, out_path)
    meta["loss_history"] = history
    return meta


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def print_dataset(meta):
    a, s = meta["args"], meta["summary"]
    print(f"toy dataset: {a['size']}px, seed {a['seed']}, cooccur flag {a['cooccur']}, multi flag {a['multi']}")
    for split, d in s.items():
        print(f"  {split:9s} {d['images']:5d} images {d['objects']:5d} objects  co-occurrence {d['cooccurrence']:.3f}"
              f"  multi-class {d['multi_class']:.3f}")
    print("  train_aug images per class: " + ", ".join(f"{n} {c}" for n, c in s["train_aug"]["per_class"].items()))
    print("  home backgrounds: " + ", ".join(f"{n}->{b}" for n, b in meta["home"].items()))


def print_clip(meta):
    print(f"tiny CLIP: pretraining {meta['train_seconds']:.0f}s ({meta['pretrain_args']['steps']} steps), "
          f"final loss {meta['final_loss']:.3f}")
    for t in ("template0", "template1"):
        e = meta.get("eval", {}).get(t)
        if e:
            print(f"  '{e['template']}': zero-shot acc {e['zero_shot_acc']:.3f} on {meta['eval']['n_single_val']} "
                  f"single-object val images, bias mean {e['bias_mean']:+.3f}, min {min(e['bias'].values()):+.3f}")
            print("    bias per class: " + ", ".join(f"{n} {g:+.3f}" for n, g in e["bias"].items()))
    if "object_over_home" in meta.get("eval", {}):
        print(f"  sim(class text, object alone) - sim(class text, home background alone): mean "
              f"{meta['eval']['object_over_home_mean']:+.3f}, min {min(meta['eval']['object_over_home'].values()):+.3f}")
    for fill in FILLS:
        if f"object_alone_acc_{fill}" in meta.get("eval", {}):
            print(f"  zero-shot acc on the objects alone (GT mask at CLIP resolution, {fill} fill elsewhere; "
                  f"'{TEMPLATES[-1]}'): {meta['eval'][f'object_alone_acc_{fill}']:.3f}")
    if "scenery_behind_acc" in meta.get("eval", {}):
        print(f"  the background alone (object cut out by its GT mask, mean fill): its scenery's word is the nearest "
              f"of all {len(NAMES) + len(BACKGROUNDS)} words for {meta['eval']['scenery_behind_acc']:.3f}, the "
              f"object's class for {meta['eval']['scenery_behind_class_top1']:.3f}")


# The flags that shape the dataset, their defaults, and their names in toy_meta.json's "args". cooccur 0.95:
# an object sits on its home background 95% of the time, so the CAM network spreads onto it (docs/toy.md).
WORLD_FLAGS = dict(n_train=2000, n_val=300, n_train_subset=300, size=96, seed=0, cooccur=0.95, multi=0.25)


def world_args(args):
    """Fill each dataset flag not given (None) from the world already in --out, else from WORLD_FLAGS: rerunning
    `tools/make_toy.py --out DIR` (as run.sh does every time) keeps DIR's world, e.g. one made with --seed 1, and
    only retrains what an older make_toy made differently; a flag given explicitly remakes the world."""
    old = (runtime.read_json(os.path.join(args.out, "toy_meta.json")) or {}).get("args", {})
    for name, default in WORLD_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, old.get(name, default))
    return args


def main(args):
    t0 = time.time()
    if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.exists(os.path.join(args.out, "toy_meta.json")):
        raise ValueError(f"--out {args.out} holds files but no toy_meta.json: it is not a toy world, and make_toy would "
                         "write its images, split lists and class_names.txt into it; pass a new or empty folder")
    args = world_args(args)
    world = {k: getattr(args, k) for k in WORLD_FLAGS}
    if args.part == "clip":  # the dataset must be there, made by an earlier --part dataset (run.sh's order)
        meta = runtime.read_json(os.path.join(args.out, "toy_meta.json"))
        if not world_is_complete(meta, dataset_args(**world)):
            raise ValueError(f"--part clip: {args.out} holds no complete world made with these flags; run "
                             f"`python tools/make_toy.py --out {args.out} --part dataset` first")
    else:
        meta = generate_dataset(args.out, **world, force=args.force)
        print(f"dataset ready in {time.time() - t0:.0f}s at {args.out}")
        print_dataset(meta)
    if args.part == "dataset":
        return meta, None
    cmeta = pretrain_clip(args.out, os.path.join(args.out, "tiny_clip.pt"), args.clip_steps, args.clip_batch,
                          args.clip_lr, args.bg_caption_frac, args.plain_frac, args.scene_frac, args.scene_hole_frac,
                          seed=args.seed, force=args.force, threads=args.threads or None, cone=args.cone,
                          gap_cos=args.gap_cos)
    print_clip(cmeta)
    e = cmeta["eval"]["template0"]
    ok = (e["zero_shot_acc"] >= 0.9 and cmeta["eval"]["object_alone_acc_mean"] >= 0.9 and e["bias_mean"] >= 0.15
          and min(e["bias"].values()) > 0)
    print("targets (zero-shot >= 0.90 on full images and on objects alone with the mean fill, bias >= +0.15 "
          f"and > 0 per class): {'met' if ok else 'NOT met'}")
    return meta, cmeta


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=str, default=os.path.join(runtime.REPO, "data", "toy"),
                   help="output folder (VOC layout); the default is the repository's data/toy, where "
                        "--dataset toy looks")
    # The dataset's flags default to None: the values of the world already in --out, else WORLD_FLAGS's.
    count, unit = runtime.positive_int, runtime.unit_float
    for name, kind, what in [("size", count, "image side in pixels"), ("n_train", count, "train_aug images"),
                             ("n_val", count, "val images"),
                             ("n_train_subset", count, "train.txt = the first N of train_aug (like VOC train, where "
                                                     "seeds are scored)"),
                             ("cooccur", unit, "probability an object sits on its home background"),
                             ("multi", unit, "share of images holding two classes"),
                             ("seed", runtime.nonnegative_int, "seed of the dataset and of CLIP pretraining")]:
        p.add_argument(f"--{name}", type=kind, default=None,
                       help=f"{what}; default: the world in --out has it, else {WORLD_FLAGS[name]}")
    p.add_argument("--clip_steps", type=count, default=900, help="CLIP pretraining steps (900: ~94%% zero-shot)")
    p.add_argument("--clip_batch", type=count, default=128, help="CLIP pretraining batch size")
    p.add_argument("--clip_lr", type=runtime.positive_float, default=1e-3, help="CLIP peak learning rate (AdamW, cosine)")
    p.add_argument("--bg_caption_frac", type=unit, default=0.0,
                   help="share of CLIP samples that are a class's home background alone, captioned with the class "
                        "(an explicit extra bias; 0: the bias comes from co-occurrence alone)")
    p.add_argument("--plain_frac", type=unit, default=0.2,
                   help="share of CLIP samples that are objects on a plain backdrop, captioned with their classes")
    p.add_argument("--scene_frac", type=unit, default=0.25,
                   help="share of CLIP samples that are scenery alone, captioned with the scenery's name")
    p.add_argument("--scene_hole_frac", type=unit, default=0.5,
                   help="share of those scenery samples shown with a flat hole where an object was cut out")
    p.add_argument("--cone", type=runtime.unit_below_one, default=0.0,
                   help="experiment, off (0) by default: real CLIP's feature geometry, each feature this share (rho) "
                        "in its modality's fixed shared direction (0.75: text-text cosines near 0.75, image-text "
                        "0.1-0.35, as ViT-B/32; docs/method.md, 'The toy presets')")
    p.add_argument("--gap_cos", type=runtime.unit_float, default=0.2,
                   help="with --cone: cosine of the image and the text shared directions (kappa)")
    p.add_argument("--threads", type=runtime.nonnegative_int, default=1,
                   help="torch CPU threads (0: torch's default); on a busy 2-core box 2 threads ran 6x slower than 1")
    p.add_argument("--force", action="store_true", help="regenerate the dataset and retrain CLIP even if valid")
    p.add_argument("--part", type=str, default="all", choices=("all", "dataset", "clip"),
                   help="make everything, the dataset only, or the CLIP only (of a dataset already made): run.sh "
                        "trains the CAM network, which needs no CLIP, while the CLIP trains")
    return p


if __name__ == "__main__":
    runtime.run_cli(main, get_parser())
