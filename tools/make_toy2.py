"""A second, independent toy world ("world 2") for SemPLeS: a procedural VOC-layout dataset and a tiny CLIP
trained on it, written apart from tools/make_toy.py (own classes, shapes, backgrounds, co-occurrence
structure and CLIP recipe) so that claims about the method can be checked on a world it was not tuned to.

    OMP_NUM_THREADS=1 .venv/bin/python tools/make_toy2.py --out data/toy2 [--seed N]

Writes into OUT: JPEGImages/{id}.jpg, SegmentationClass/{id}.png (0 background, 1..8, 255 on a band along
every object boundary), ImageSets/Segmentation/{train_aug,train,val}.txt, class_names.txt, tiny_clip.pt
({"state_dict", "meta"}, read by clip.load) and world2_meta.json (args, usual backgrounds, per-image objects,
fidelity numbers, "complete": true last). Not toy_meta.json: run.sh would take the folder for a make_toy world.

The world. Objects are built from signed primitives (ellipses, capsules, boxes, convex polygons) evaluated
on a 2x supersampled grid. Co-occurrence is not one-class-one-home: fish and duck share the ocean, bus and
robot share the street, horse has two usual backgrounds (meadow, desert); each object sits on a usual
background with probability --cooccur (else any other). Scenes hold one background or two, split by a
slanted line or a circular arc. Work already done with the same arguments is skipped; --force redoes it.
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
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
import clip
from semples import datasets, runtime
from semples.method import TEMPLATE, clip_normalise, fill_colour

VERSION = 1
CLASSES = ["fish", "kite", "horse", "bus", "lamp", "tree", "duck", "robot"]
BACKGROUNDS = ["ocean", "meadow", "street", "night", "desert", "kitchen", "forest", "beach", "ice"]
USUAL = {"fish": ["ocean"], "duck": ["ocean"], "bus": ["street"], "robot": ["street"],
         "horse": ["meadow", "desert"], "kite": ["beach"], "lamp": ["kitchen"], "tree": ["forest"]}
NEUTRAL = ["night", "ice"]  # nobody's usual background: the extra region of a two-region scene comes from here
# Object size: half-extent of the local frame as a fraction of the image side (thin classes drawn larger).
SCALE = {"fish": (0.34, 0.46), "kite": (0.38, 0.5), "horse": (0.36, 0.48), "bus": (0.3, 0.4),
         "lamp": (0.4, 0.5), "tree": (0.38, 0.5), "duck": (0.35, 0.46), "robot": (0.38, 0.5)}
# Caption templates; TEMPLATE ("a photo of {}.") is the one every pipeline stage queries, so it is in the mix.
CAPTIONS = [TEMPLATE, "an image of {}.", "{} in the scene.", "there is a {} here.", "a picture showing {}."]
CLIP_CONFIG = dict(embed_dim=96, image_resolution=56, vision_layers=3, vision_width=144, vision_patch_size=14,
                   context_length=32, vocab_size=49408, transformer_width=96, transformer_heads=3,
                   transformer_layers=2)  # image cost 16 tokens x 144^2 x 3 = 0.95x make_toy's 16 x 128^2 x 4


# ----------------------------------------------------------------------------------------------
# Objects: primitives are (inside-test on local coords u, v) -> bool; a class is a list of (test, RGB)
# ----------------------------------------------------------------------------------------------
def ell(cx, cy, rx, ry):
    return lambda u, v: ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1


def box(x0, y0, x1, y1):
    return lambda u, v: (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


def capsule(x0, y0, x1, y1, r):
    """A thick line segment: points within r of the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    def inside(u, v):
        t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
        return (u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2 <= r * r
    return inside


def convex(*pts):
    """Inside a convex polygon given in either orientation: every edge's cross product has one sign."""
    p = np.asarray(pts, float)
    def inside(u, v):
        c = [(b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0]) for a, b in zip(p, np.roll(p, -1, 0))]
        return np.all([x >= 0 for x in c], 0) | np.all([x <= 0 for x in c], 0)
    return inside


def both(f, g):
    return lambda u, v: f(u, v) & g(u, v)


def parts_of(name, rng):
    """The primitives of one instance of class `name`, back to front, in a frame of about [-1, 1]^2."""
    r = rng.uniform
    if name == "fish":  # an orange clownfish with white bands
        body = ell(-0.05, 0, 0.75, 0.42)
        return [(convex((0.55, 0), (1.0, -0.5), (1.0, 0.5)), (250, 120, 20)),
                (convex((-0.25, -0.3), (0.15, -0.62), (0.35, -0.3)), (240, 105, 15)), (body, (250, 125, 25)),
                (both(body, box(-0.05, -1, 0.12, 1)), (250, 250, 245)),
                (both(body, box(-0.5, -1, -0.38, 1)), (250, 250, 245)), (ell(-0.58, -0.1, 0.07, 0.07), (10, 10, 10))]
    if name == "duck":  # a mallard: green head, white collar, orange bill
        return [(ell(0.15, 0.25, 0.75, 0.36), (150, 120, 90)), (ell(0.25, 0.15, 0.42, 0.18), (100, 80, 60)),
                (box(0.2, 0.1, 0.45, 0.2), (40, 70, 200)), (capsule(-0.45, 0.0, -0.45, -0.25, 0.16), (240, 240, 240)),
                (ell(-0.5, -0.45, 0.3, 0.26), (20, 120, 55)),
                (convex((-0.72, -0.48), (-1.05, -0.38), (-0.72, -0.32)), (250, 150, 20)),
                (ell(-0.55, -0.52, 0.05, 0.05), (5, 5, 5))]
    if name == "kite":  # a red/blue diamond on a long thin string with yellow bows
        cy, a, b = -0.35, r(0.45, 0.55), 0.62
        dia = lambda u, v: np.abs(u) / a + np.abs(v - cy) / b <= 1  # noqa: E731
        sway = r(-0.35, 0.35)
        out = [(dia, (220, 30, 40)), (both(dia, lambda u, v: (u * (v - cy)) > 0), (30, 60, 210)),
               (capsule(0, cy - b, 0, cy + b, 0.025), (60, 40, 30)), (capsule(-a, cy, a, cy, 0.025), (60, 40, 30))]
        pts = [(0, cy + b), (sway * 0.5, 0.55), (sway, 1.0)]
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            out.append((capsule(x0, y0, x1, y1, 0.03), (40, 40, 40)))
        for t in (0.4, 0.8):
            x, y = sway * t, 0.27 + 0.73 * t
            out.append((convex((x, y), (x - 0.14, y - 0.08), (x - 0.14, y + 0.08)), (250, 220, 20)))
            out.append((convex((x, y), (x + 0.14, y - 0.08), (x + 0.14, y + 0.08)), (250, 220, 20)))
        return out
    if name == "horse":  # chestnut body, thin legs, black mane and tail
        out = [(capsule(x, 0.1, x + r(-0.08, 0.08), 0.85, 0.06), (110, 60, 30)) for x in (-0.45, -0.3, 0.3, 0.45)]
        out += [(box(x - 0.08, 0.82, x + 0.09, 0.92), (20, 20, 20)) for x in (-0.45, -0.3, 0.3, 0.45)]
        return out + [(capsule(-0.6, -0.1, -0.85, 0.45, 0.06), (20, 15, 10)), (ell(0, 0, 0.62, 0.28), (130, 70, 35)),
                      (capsule(0.45, -0.1, 0.72, -0.55, 0.15), (130, 70, 35)),
                      (capsule(0.4, -0.22, 0.66, -0.7, 0.05), (20, 15, 10)),
                      (capsule(0.72, -0.6, 1.0, -0.38, 0.1), (125, 68, 34)), (ell(0.8, -0.58, 0.04, 0.04), (5, 5, 5))]
    if name == "bus":  # a red double-decker with two rows of windows
        n = int(rng.integers(4, 7))
        xs = np.linspace(-0.9, 0.9, n + 1)
        out = [(box(-1, -0.62, 1, 0.48), (200, 25, 30)), (box(-1, -0.06, 1, 0.02), (245, 200, 40))]
        out += [(box(a + 0.04, y0, b - 0.04, y1), (170, 210, 235)) for a, b in zip(xs[:-1], xs[1:])
                for y0, y1 in ((-0.5, -0.2), (0.08, 0.3))]
        return out + [(p, c) for x in (-0.6, 0.6) for p, c in ((ell(x, 0.5, 0.18, 0.18), (20, 20, 20)),
                                                              (ell(x, 0.5, 0.07, 0.07), (170, 170, 175)))]
    if name == "lamp":  # a table lamp: green shade, thin brass pole, round base
        return [(capsule(0, -0.35, 0, 0.75, 0.04), (200, 165, 50)), (ell(0, 0.82, 0.38, 0.11), (190, 155, 45)),
                (ell(0, -0.3, 0.2, 0.08), (255, 245, 180)),
                (convex((-0.5, -0.3), (0.5, -0.3), (0.28, -0.9), (-0.28, -0.9)), (30, 150, 95)),
                (capsule(0.3, -0.3, 0.3, 0.0, 0.02), (200, 165, 50)), (ell(0.3, 0.02, 0.04, 0.05), (200, 165, 50))]
    if name == "tree":  # brown trunk, lime crown of blobs, red apples
        out = [(box(-0.11, 0.05, 0.11, 1.0), (105, 65, 30)), (capsule(0, 0.3, 0.35, 0.05, 0.05), (105, 65, 30))]
        out += [(ell(r(-0.45, 0.45), r(-0.55, -0.25), r(0.3, 0.42), r(0.28, 0.38)), (120, 200, 40)) for _ in range(4)]
        out += [(ell(0, -0.4, 0.5, 0.38), (110, 190, 35))]
        return out + [(ell(r(-0.45, 0.45), r(-0.65, -0.15), 0.07, 0.07), (220, 20, 30)) for _ in range(5)]
    if name == "robot":  # silver boxes, cyan eyes, antenna with a red ball, thin arms
        return [(capsule(s * 0.45, -0.1, s * 0.78, 0.3, 0.06), (140, 145, 155)) for s in (-1, 1)] + \
               [(box(x, 0.5, x + 0.2, 0.92), (120, 125, 135)) for x in (-0.3, 0.1)] + \
               [(box(-0.45, -0.2, 0.45, 0.52), (180, 185, 195)), (box(-0.3, -0.62, 0.3, -0.26), (190, 195, 205)),
                (capsule(0, -0.62, 0, -0.85, 0.03), (90, 90, 95)), (ell(0, -0.88, 0.07, 0.07), (230, 30, 30)),
                (ell(-0.14, -0.46, 0.07, 0.07), (0, 225, 235)), (ell(0.14, -0.46, 0.07, 0.07), (0, 225, 235)),
                (box(-0.15, -0.35, 0.15, -0.31), (40, 40, 40)), (box(-0.25, 0.0, -0.05, 0.15), (230, 40, 40)),
                (box(0.05, 0.0, 0.25, 0.15), (40, 200, 60))]
    raise ValueError(name)


def render_object(name, rng, S, cx, cy, scale, angle, flip):
    """Colour premultiplied by coverage [S, S, 3] and coverage [S, S] of one object, 2x supersampled."""
    g = (np.arange(2 * S) + 0.5) / 2  # sub-pixel centres in pixel units
    X, Y = np.meshgrid(g, g)
    ca, sa = math.cos(angle), math.sin(angle)
    u = flip * ((X - cx) * ca + (Y - cy) * sa) / scale  # the inverse rotation into the local frame
    v = (-(X - cx) * sa + (Y - cy) * ca) / scale
    rgb, alpha = np.zeros((2 * S, 2 * S, 3)), np.zeros((2 * S, 2 * S))
    tint = rng.uniform(0.88, 1.12, 3)
    for test, colour in parts_of(name, rng):
        sel = test(u, v)
        rgb[sel] = np.asarray(colour, float) * tint * (1.0 - 0.12 * np.clip(v[sel], -1, 1))[:, None]  # top light
        alpha[sel] = 1.0
    pool = lambda a: a.reshape(S, 2, S, 2, *a.shape[2:]).mean((1, 3))  # noqa: E731
    return pool(rgb * alpha[..., None]), pool(alpha)


# ----------------------------------------------------------------------------------------------
# Backgrounds: sums of random plane waves, stripes, tiles and scattered dots (no value-noise grids)
# ----------------------------------------------------------------------------------------------
def waves(rng, X, Y, n=6, fmin=1.0, fmax=6.0):
    """A smooth random field of about unit amplitude: n plane waves of random direction and frequency."""
    th, f, ph = rng.uniform(0, np.pi, n), rng.uniform(fmin, fmax, n), rng.uniform(0, 2 * np.pi, n)
    field = sum(np.cos(2 * np.pi * fk * (X * np.cos(t) + Y * np.sin(t)) + p) for t, fk, p in zip(th, f, ph))
    return field / math.sqrt(n / 2)


def dots(rng, X, Y, n, radius, colours, img):
    """Scatter n discs of a given radius (in image fractions) with colours drawn from `colours`."""
    for _ in range(n):
        x, y, c = rng.random(), rng.random(), colours[int(rng.integers(len(colours)))]
        img[(X - x) ** 2 + (Y - y) ** 2 <= radius ** 2] = c
    return img


def background(name, rng, S):
    """Texture [S, S, 3] (float RGB) of background `name` over the whole image."""
    X, Y = np.meshgrid((np.arange(S) + 0.5) / S, (np.arange(S) + 0.5) / S)
    w = lambda *a: waves(rng, X, Y, *a)[..., None]  # noqa: E731
    def lerp(a, b, t):
        a, b = np.asarray(a, float), np.asarray(b, float)
        return a + (b - a) * t[..., None]

    k = rng.uniform(0.92, 1.08, 3)
    if name == "ocean":
        crest = np.sin(2 * np.pi * (Y * rng.uniform(10, 16) + 0.25 * waves(rng, X, Y, 4, 1, 3)))
        img = lerp((15, 55, 135), (35, 110, 175), Y) * k + 25 * crest[..., None]
        img[crest > 0.93] = (225, 240, 250)
    elif name == "meadow":
        img = np.array((95, 175, 60)) * k + 18 * w(8, 2, 8)
        img = dots(rng, X, Y, int(rng.integers(25, 45)), 0.012, [(250, 250, 250), (250, 225, 40), (240, 120, 180)], img)
    elif name == "street":
        t = rng.uniform(0, np.pi)
        along, across = X * np.cos(t) + Y * np.sin(t), -X * np.sin(t) + Y * np.cos(t)
        n0 = across.mean() + rng.uniform(-0.15, 0.15)
        img = np.array((72, 72, 78)) * k + rng.normal(0, 6, (S, S, 1))
        img[(np.abs(across - n0) < 0.017) & ((along * 6 + rng.random()) % 1 < 0.5)] = (240, 200, 40)
        kerb = across > n0 + 0.3
        img[kerb] = np.array((165, 150, 140)) * k
        img[kerb & (((across * 10) % 1 < 0.08) | ((along * 10) % 1 < 0.08))] = (110, 100, 95)
    elif name == "night":
        img = lerp((5, 8, 35), (30, 30, 85), Y) * k
        img = dots(rng, X, Y, int(rng.integers(20, 40)), 0.007, [(255, 255, 240), (200, 210, 255)], img)
        if rng.random() < 0.5:
            img = dots(rng, X, Y, 1, rng.uniform(0.06, 0.1), [(245, 240, 200)], img)
    elif name == "desert":
        ridge = np.sin(2 * np.pi * (X * rng.uniform(1, 2) + 0.3 * np.sin(2 * np.pi * Y * rng.uniform(1, 2.5))))
        img = np.array((225, 150, 75)) * k * (0.88 + 0.12 * ridge)[..., None]
        img += 8 * np.sin(2 * np.pi * 30 * (Y + 0.05 * ridge))[..., None]
    elif name == "kitchen":
        n = rng.uniform(5, 8)
        odd = (np.floor(X * n) + np.floor(Y * n)) % 2 == 1
        img = np.where(odd[..., None], np.array([(40, 40, 55), (175, 40, 40)][int(rng.integers(2))]) * k,
                       np.array((235, 233, 225)) * k)
        img[((X * n) % 1 < 0.05) | ((Y * n) % 1 < 0.05)] = (150, 150, 150)
    elif name == "forest":
        img = np.array((25, 75, 30)) * k + 14 * w(8, 3, 10)
        for _ in range(int(rng.integers(4, 8))):
            x, half = rng.random(), rng.uniform(0.015, 0.035)
            img[np.abs(X - x - 0.03 * np.sin(6 * Y)) < half] = np.array((70, 45, 25)) * rng.uniform(0.8, 1.1)
    elif name == "beach":
        img = np.array((238, 218, 172)) * k + rng.normal(0, 5, (S, S, 1))
        foam = np.abs(np.sin(2 * np.pi * (Y * rng.uniform(2, 4) + 0.08 * waves(rng, X, Y, 3, 2, 5))))
        img[foam < 0.06] = (250, 250, 245)
        img = dots(rng, X, Y, int(rng.integers(12, 25)), 0.01, [(160, 150, 140), (235, 160, 160), (250, 250, 250)], img)
    elif name == "ice":
        img = np.array((215, 235, 248)) * k + 6 * w(4, 1, 3)
        img[np.abs(waves(rng, X, Y, 5, 2, 6)) < 0.04] = (140, 170, 195)
    else:
        raise ValueError(name)
    return img


def camera(rng, img):
    """Exposure, white balance, an occasional 3x3 box blur and sensor noise; float [S, S, 3] -> uint8."""
    img = np.clip(img, 0, 255)
    if rng.random() < 0.3:
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(p[dy:dy + img.shape[0], dx:dx + img.shape[1]] for dy in range(3) for dx in range(3)) / 9
    img = img * rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, 3) + rng.uniform(-12, 12)
    return np.clip(np.round(img + rng.normal(0, rng.uniform(1.5, 5), img.shape)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------
def split_regions(rng, S):
    """bool [S, S]: True on the second region, cut by a slanted line or a circular arc."""
    X, Y = np.meshgrid((np.arange(S) + 0.5) / S, (np.arange(S) + 0.5) / S)
    if rng.random() < 0.5:
        t = rng.uniform(0, 2 * np.pi)
        return (X - 0.5) * np.cos(t) + (Y - 0.5) * np.sin(t) > rng.uniform(-0.12, 0.12)
    cx, cy = rng.choice([-0.1, 1.1]), rng.uniform(-0.1, 1.1)
    return (X - cx) ** 2 + (Y - cy) ** 2 < rng.uniform(0.45, 0.75) ** 2


def boundary_band(inst, width):
    """Pixels whose 8-neighbourhood holds another instance id (both sides: a band 2*width px wide)."""
    band = np.zeros(inst.shape, bool)
    S = inst.shape[0]
    p = np.pad(inst, width, mode="edge")
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            band |= p[width + dy:width + dy + S, width + dx:width + dx + S] != inst
    return band


def make_scene(rng, S, cooccur, multi):
    """One image: 1-2 classes, 1-3 objects. Returns (uint8 image, uint8 mask, info for world2_meta.json)."""
    classes = [str(c) for c in rng.choice(CLASSES, 2 if rng.random() < multi else 1, replace=False)]
    if len(classes) == 1:
        objs = classes * int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.1]))
    else:
        objs = classes + ([classes[int(rng.integers(2))]] if rng.random() < 0.2 else [])
    bg_of = {}
    for c in classes:
        usual = rng.random() < cooccur
        bg_of[c] = str(rng.choice(USUAL[c] if usual else [b for b in BACKGROUNDS if b not in USUAL[c]]))
    regions = list(dict.fromkeys(bg_of[c] for c in classes))
    if len(regions) == 1 and rng.random() < 0.3:
        regions.append(str(rng.choice([b for b in NEUTRAL if b != regions[0]])))
    second = split_regions(rng, S) if len(regions) == 2 else np.zeros((S, S), bool)
    canvas = np.where(second[..., None], background(regions[-1], rng, S), background(regions[0], rng, S))
    region_of = {b: (second if i else ~second) for i, b in enumerate(regions)}
    shrink = [1.0, 0.8, 0.68][len(objs) - 1]
    width, min_px = max(1, S // 96), max(10, S * S // 400)
    for attempt in range(10):
        img, inst, lab, boxes = canvas.copy(), np.zeros((S, S), np.uint8), np.zeros((S, S), np.uint8), []
        for j, c in enumerate(objs):
            scale = rng.uniform(*SCALE[c]) * shrink * S
            home = region_of[bg_of[c]]
            best = None
            for _ in range(20):  # a centre in the object's region, away from the others
                cy, cx = np.argwhere(home)[int(rng.integers(home.sum()))] + 0.5
                cx, cy = np.clip([cx, cy], 0.8 * scale, S - 0.8 * scale)
                b = (cx - scale, cy - scale, cx + scale, cy + scale)
                ys, xs = slice(int(max(0, b[1])), int(b[3])), slice(int(max(0, b[0])), int(b[2]))
                score = home[ys, xs].mean() - 2 * max([overlap(b, o) for o in boxes] + [0])
                if best is None or score > best[0]:
                    best = (score, cx, cy, b)
                if score > 0.75:
                    break
            _, cx, cy, b = best
            boxes.append(b)
            rgb, a = render_object(c, rng, S, cx, cy, scale, rng.uniform(-0.2, 0.2), rng.choice([-1.0, 1.0]))
            img = img * (1 - a[..., None]) + rgb
            inst[a >= 0.5], lab[a >= 0.5] = j + 1, CLASSES.index(c) + 1
        band = boundary_band(inst, width)
        if all(((inst == j + 1) & ~band).sum() >= min_px for j in range(len(objs))):
            break
    mask = np.where(band, 255, lab).astype(np.uint8)
    objects = []
    for j, c in enumerate(objs):
        seen = (inst == j + 1) & ~band
        if seen.sum() < min_px:  # hidden after ten tries: its few pixels are ignored, not labelled
            mask[inst == j + 1] = 255
            continue
        objects.append({"cls": c, "bg": bg_of[c], "usual": bg_of[c] in USUAL[c], "area": float((inst == j + 1).mean())})
    return camera(rng, img), mask, {"regions": regions, "objects": objects}


def overlap(a, b):
    """Intersection over the smaller box."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, iw) * max(0.0, ih) / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def lone_object(rng, S, c, fill):
    """Class c alone on a flat colour `fill` (RGB 0..255): the CLIP recipe's 'object without scenery'."""
    scale = rng.uniform(*SCALE[c]) * S
    cx, cy = rng.uniform(0.8, 1.2, 2) * S / 2
    rgb, a = render_object(c, rng, S, cx, cy, scale, rng.uniform(-0.2, 0.2), rng.choice([-1.0, 1.0]))
    return camera(rng, np.asarray(fill, float) * (1 - a[..., None]) + rgb)


def scenery(rng, S, b):
    return camera(rng, background(b, rng, S))


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------
def write_json(path, obj):
    with runtime.atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=0)


def make_dataset(out, args, quiet=False):
    """Write the images, masks and lists; returns world2_meta.json's dict (not yet 'complete')."""
    splits = {"train_aug": [f"w2_{i:06d}" for i in range(args["n_train"])],
              "val": [f"w2_{args['n_train'] + i:06d}" for i in range(args["n_val"])]}
    splits["train"] = splits["train_aug"][:args["n_train_subset"]]
    images, t0 = {}, time.time()
    for stream, split in ((1, "train_aug"), (2, "val")):
        for i, image_id in enumerate(splits[split]):
            img, mask, info = make_scene(np.random.default_rng([args["seed"], stream, i]), args["size"],
                                         args["cooccur"], args["multi"])
            with runtime.atomic_path(datasets.image_path(out, image_id)) as tmp:
                Image.fromarray(img).save(tmp, format="JPEG", quality=95)
            datasets.save_mask(os.path.join(out, "SegmentationClass", f"{image_id}.png"), mask)
            images[image_id] = {"split": split, **info}
            if not quiet and len(images) % 500 == 0:
                print(f"  {len(images)} images, {time.time() - t0:.0f}s", flush=True)
    for split, ids in splits.items():
        with runtime.atomic_path(os.path.join(out, "ImageSets", "Segmentation", f"{split}.txt")) as tmp:
            with open(tmp, "w") as f:
                f.write("".join(i + "\n" for i in ids))
    with runtime.atomic_path(os.path.join(out, "class_names.txt")) as tmp, open(tmp, "w") as f:
        f.write("".join(c + "\n" for c in CLASSES))
    objs = [o for i in images.values() for o in i["objects"]]
    summary = {"images": len(images), "objects": len(objs),
               "on_usual_background": float(np.mean([o["usual"] for o in objs])),
               "two_classes": float(np.mean([len({o["cls"] for o in i["objects"]}) == 2 for i in images.values()])),
               "object_area": {q: float(np.quantile([o["area"] for o in objs], p))
                               for q, p in (("p05", 0.05), ("median", 0.5), ("p95", 0.95))},
               "per_class": {c: sum(o["cls"] == c for o in objs) for c in CLASSES},
               "seconds": time.time() - t0}
    return {"args": args, "class_names": CLASSES, "backgrounds": BACKGROUNDS, "usual": USUAL, "neutral": NEUTRAL,
            "images": images, "summary": summary}


# ----------------------------------------------------------------------------------------------
# The tiny CLIP: label-set contrastive training on scenes, lone objects and bare scenery
# ----------------------------------------------------------------------------------------------
def load_images(root, split):
    ids = datasets.read_ids(root, split)
    x = np.stack([datasets.read_image(datasets.image_path(root, i)) for i in ids])
    return ids, torch.from_numpy(x).permute(0, 3, 1, 2)


def to_tensor(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def jitter_view(x, res, g, min_zoom):
    """A random window (side min_zoom..1 of the image), shifted and mirrored, resampled to CLIP's resolution."""
    n = len(x)
    s = min_zoom + (1 - min_zoom) * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (1 - s)[:, None]
    mirror = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = s * mirror, s, shift
    grid = F.affine_grid(theta, (n, 3, res, res), align_corners=False)
    return clip_normalise(F.grid_sample(x.float() / 255, grid, mode="bilinear", align_corners=False))


def phrase(words):
    return " and ".join(words)


def train_clip(root, args, quiet=False):
    """Returns (model, info). Only the token-embedding rows of caption words train: a small local table is
    used during training and written back into the full 49408-row table at the end."""
    torch.manual_seed(args["seed"])
    g = torch.Generator().manual_seed(args["seed"] + 1)
    model = clip.model.CLIP(**CLIP_CONFIG)
    S, res, t0 = args["size"], CLIP_CONFIG["image_resolution"], time.time()
    ids, scenes = load_images(root, "train_aug")
    labels = datasets.load_labels(root, ids, len(CLASSES))
    scene_words = [sorted({CLASSES[k] for k in np.flatnonzero(y)}) for y in labels]
    rng = np.random.default_rng([args["seed"], 7])
    mean_rgb = (255 * fill_colour("mean")).tolist()
    n = args["aux_pool"]
    lone_cls = [CLASSES[i % len(CLASSES)] for i in range(n)]
    fills = [mean_rgb if rng.random() < 0.5 else rng.integers(0, 256, 3).tolist() for _ in range(n)]
    lone = to_tensor([lone_object(rng, S, c, f) for c, f in zip(lone_cls, fills)])
    bare_bg = [BACKGROUNDS[i % len(BACKGROUNDS)] for i in range(n)]
    bare = to_tensor([scenery(rng, S, b) for b in bare_bg])
    # (images, caption words, share of a batch, smallest crop side). Scenes are cropped hard, like web photos whose
    # caption names an object the crop may miss: a crop of ocean captioned "fish" is where the co-occurrence bias
    # comes from. Lone objects and bare scenery are cropped gently (their caption must stay true).
    sources = [(scenes, scene_words, 1 - args["lone_frac"] - args["bare_frac"], args["min_zoom"]),
               (lone, [[c] for c in lone_cls], args["lone_frac"], 0.8),
               (bare, [[b] for b in bare_bg], args["bare_frac"], 0.8)]
    # Every caption that can occur, tokenised once; the words' rows form the small trainable table.
    phrases = {phrase(w) for _, ws, _, _ in sources for w in ws} | {phrase(w[::-1]) for w in scene_words}
    token_of = {(t, p): clip.tokenize([t.format(p)], context_length=CLIP_CONFIG["context_length"])[0]
                for t in CAPTIONS for p in sorted(phrases)}
    used = torch.unique(torch.stack(list(token_of.values())))
    local = torch.full((CLIP_CONFIG["vocab_size"],), 0, dtype=torch.long)
    local[used] = torch.arange(len(used))
    table = torch.nn.Embedding(len(used), CLIP_CONFIG["transformer_width"])
    with torch.no_grad():
        table.weight.copy_(model.token_embedding.weight[used])
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.ndim < 2] + list(table.parameters()),
                              "weight_decay": 0.0}], lr=args["clip_lr"], betas=(0.9, 0.98), eps=1e-6)
    counts = np.round(np.array([s[2] for s in sources]) * args["clip_batch"]).astype(int)
    losses = []
    for step in range(args["clip_steps"]):
        for grp in opt.param_groups:
            grp["lr"] = runtime.cosine_lr(args["clip_lr"], step, args["clip_steps"], max(1, args["clip_steps"] // 15))
        xs, words = [], []
        for (x, ws, _, zoom), k in zip(sources, counts):
            pick = torch.randint(len(x), (int(k),), generator=g)
            xs.append(jitter_view(x[pick], res, g, zoom))
            words += [ws[i] for i in pick.tolist()]
        which = torch.randint(len(CAPTIONS), (len(words),), generator=g).tolist()
        order = torch.rand(len(words), generator=g).tolist()  # two names: in either order
        tok = torch.stack([token_of[(CAPTIONS[t], phrase(w if o < 0.5 else w[::-1]))]
                           for w, t, o in zip(words, which, order)])
        eot = tok.argmax(-1)
        tok = tok[:, :int(eot.max()) + 1]  # causal text tower: positions after EOT change nothing
        img = F.normalize(model.encode_image(torch.cat(xs)), dim=-1)
        txt = F.normalize(model.encode_token_embeddings(table(local[tok]), eot), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        key = [phrase(w) for w in words]  # same label set = a positive pair, whatever the template
        same = torch.tensor([[a == b for b in key] for a in key], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)
        loss = -0.5 * ((target * logits.log_softmax(1)).sum(1).mean()
                       + (target * logits.T.log_softmax(1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if not quiet and (step % 100 == 0 or step == args["clip_steps"] - 1):
            print(f"  clip step {step}/{args['clip_steps']} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    with torch.no_grad():
        model.token_embedding.weight[used] = table.weight
    model.token_embedding.weight.requires_grad_(True)
    return model.eval(), {"seconds": time.time() - t0, "final_loss": losses[-1], "loss_every_10": losses[::10]}


@torch.no_grad()
def fidelity(model, root, seed, n_bg=24):
    """The three targets, measured with the pipeline's text 'a photo of {class}.' (semples.method.TEMPLATE)."""
    res = model.visual.input_resolution
    ids, x = load_images(root, "val")
    y = datasets.load_labels(root, ids, len(CLASSES))
    one = np.flatnonzero(y.sum(1) == 1)
    if len(one) == 0:
        raise ValueError(f"{root}: no single-object val image to measure CLIP on; make more val images (--n_val)")
    truth = torch.from_numpy(y[one].argmax(1))
    text = F.normalize(model.encode_text(clip.tokenize([TEMPLATE.format(c) for c in CLASSES],
                                                       context_length=model.context_length)), dim=-1)
    small = F.interpolate(x[one].float() / 255, size=(res, res), mode="bilinear", align_corners=False)
    feats = lambda im: F.normalize(model.encode_image(clip_normalise(im)), dim=-1)  # noqa: E731
    hit = lambda im: float(((feats(im) @ text.T).argmax(1) == truth).float().mean())  # noqa: E731
    out = {"n_single_val": len(one), "zero_shot_acc": hit(small)}
    # The object alone, as stage (a) shows it to CLIP: the GT mask resized (bilinear) to CLIP's input, the
    # rest filled with the pipeline's fill colour (make_toy's object_alone_acc_* measure the same way).
    fg = torch.from_numpy(np.stack([datasets.read_mask(os.path.join(datasets.mask_dir(root), f"{ids[i]}.png"))
                                    for i in one]) > 0).float()[:, None]
    m = F.interpolate(fg, size=(res, res), mode="bilinear", align_corners=False)
    for fill in ("mean", "black"):
        f = fill_colour(fill).view(1, 3, 1, 1)
        out[f"object_alone_acc_{fill}"] = hit(m * small + (1 - m) * f)
    # Co-occurrence bias: class text vs bare scenery of its usual background(s), minus the other backgrounds.
    rng = np.random.default_rng([seed, 9])
    bare = to_tensor([scenery(rng, x.shape[-1], b) for b in BACKGROUNDS for _ in range(n_bg)])
    vb = feats(F.interpolate(bare.float() / 255, size=(res, res), mode="bilinear", align_corners=False))
    sim = text @ vb.view(len(BACKGROUNDS), n_bg, -1).mean(1).T  # [classes, backgrounds]
    bias = {}
    for k, c in enumerate(CLASSES):
        usual = [BACKGROUNDS.index(b) for b in USUAL[c]]
        other = [i for i in range(len(BACKGROUNDS)) if i not in usual]
        bias[c] = float(sim[k, usual].mean() - sim[k, other].mean())
    out.update(bias=bias, bias_mean=float(np.mean(list(bias.values()))), bias_min=min(bias.values()))
    out["met"] = bool(out["zero_shot_acc"] >= 0.9 and out["object_alone_acc_mean"] >= 0.9
                      and out["bias_mean"] >= 0.15 and out["bias_min"] > 0)
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
DATA_FLAGS = ("n_train", "n_val", "n_train_subset", "size", "seed", "cooccur", "multi")
CLIP_FLAGS = ("clip_steps", "clip_batch", "clip_lr", "lone_frac", "bare_frac", "aux_pool", "min_zoom")


def report(meta):
    s, f = meta["summary"], meta.get("fidelity")
    print(f"world 2: {s['images']} images, {s['objects']} objects, "
          f"on a usual background {s['on_usual_background']:.3f}, "
          f"two classes {s['two_classes']:.3f}, object area p05/median/p95 "
          + "/".join(f"{v:.3f}" for v in s["object_area"].values()))
    print("  usual backgrounds: " + ", ".join(f"{c}->{'+'.join(b)}" for c, b in USUAL.items()))
    if f:
        print(f"tiny CLIP ({meta['clip']['seconds']:.0f}s, final loss {meta['clip']['final_loss']:.3f}), "
              f"'{TEMPLATE}' on {f['n_single_val']} single-object val images: zero-shot {f['zero_shot_acc']:.3f}, "
              f"objects alone (mean fill) {f['object_alone_acc_mean']:.3f} "
              f"(black fill {f['object_alone_acc_black']:.3f})")
        print(f"  bias mean {f['bias_mean']:+.3f}, min {f['bias_min']:+.3f}: "
              + ", ".join(f"{c} {v:+.3f}" for c, v in f["bias"].items()))
        print("targets (zero-shot >= 0.90, objects alone >= 0.90, bias mean >= +0.15 and > 0 per class): "
              + ("met" if f["met"] else "NOT met"))


def main(args):
    t0 = time.time()
    if not (0 <= args.lone_frac and 0 <= args.bare_frac and args.lone_frac + args.bare_frac < 1):
        raise ValueError("--lone_frac and --bare_frac must be >= 0 and sum to less than 1 (the rest are scenes)")
    if min(args.n_train, args.n_val, args.size, args.clip_steps, args.clip_batch, args.aux_pool) < 1:
        raise ValueError("--n_train, --n_val, --size, --clip_steps, --clip_batch and --aux_pool must be positive")
    torch.set_num_threads(args.threads)
    a = {k: getattr(args, k) for k in DATA_FLAGS}
    a.update(version=VERSION, n_train_subset=min(args.n_train_subset, args.n_train))
    c = {k: getattr(args, k) for k in CLIP_FLAGS}
    meta_path, clip_path = os.path.join(args.out, "world2_meta.json"), os.path.join(args.out, "tiny_clip.pt")
    old = None if args.force else runtime.read_json(meta_path)
    if old and old.get("complete") and old["args"] == a and old.get("clip_args") == c and os.path.exists(clip_path):
        print(f"world 2 in {args.out} is complete with these arguments: nothing to do")
        report(old)
        return old
    if old and old.get("dataset_complete") and old["args"] == a:
        meta = {k: v for k, v in old.items() if k not in ("clip_args", "clip", "fidelity", "complete")}
        print(f"dataset already in {args.out}")
    else:
        if os.path.exists(meta_path):
            os.remove(meta_path)  # an interrupted remake must not look complete
        meta = make_dataset(args.out, a, args.quiet)
        meta["dataset_complete"] = True
        write_json(meta_path, meta)
        print(f"dataset made in {time.time() - t0:.0f}s")
    model, info = train_clip(args.out, {**a, **c}, args.quiet)
    meta.update(clip_args=c, clip={**info, "config": CLIP_CONFIG, "captions": CAPTIONS})
    meta["fidelity"] = fidelity(model, args.out, args.seed)
    runtime.save_checkpoint({"state_dict": model.state_dict(),
                             "meta": {"config": CLIP_CONFIG, "class_names": CLASSES, "usual": USUAL,
                                      "template": TEMPLATE, "captions": CAPTIONS, "args": {**a, **c},
                                      "fidelity": meta["fidelity"]}}, clip_path)
    meta["seconds"] = time.time() - t0
    meta["complete"] = True  # last key, written last
    write_json(meta_path, meta)
    report(meta)
    print(f"done in {time.time() - t0:.0f}s")
    return meta


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=str, default=os.path.join(runtime.REPO, "data", "toy2"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and of the CLIP training")
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--n_train", type=int, default=2000, help="train_aug images")
    p.add_argument("--n_val", type=int, default=300, help="val images")
    p.add_argument("--n_train_subset", type=int, default=300, help="train.txt: the first N of train_aug")
    p.add_argument("--cooccur", type=float, default=0.9, help="probability an object sits on a usual background")
    p.add_argument("--multi", type=float, default=0.25, help="share of images holding two classes")
    p.add_argument("--clip_steps", type=int, default=700, help="CLIP training steps")
    p.add_argument("--clip_batch", type=int, default=128, help="CLIP batch size")
    p.add_argument("--clip_lr", type=float, default=1e-3, help="CLIP peak learning rate (AdamW, warm-up, cosine)")
    p.add_argument("--lone_frac", type=float, default=0.2,
                   help="share of each batch that is an object alone on a flat colour, captioned with its class")
    p.add_argument("--bare_frac", type=float, default=0.1,
                   help="share of each batch that is bare scenery, captioned with the background's name")
    p.add_argument("--min_zoom", type=float, default=0.45,
                   help="smallest crop side (share of the image) of a scene in CLIP training: the co-occurrence bias")
    p.add_argument("--aux_pool", type=int, default=720, help="lone objects and bare sceneries generated for CLIP")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--force", action="store_true", help="remake the dataset and retrain CLIP even if done")
    return p


if __name__ == "__main__":
    runtime.run_cli(main, get_parser())
