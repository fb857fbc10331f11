"""One page that shows what a SemPLeS run did: OUT/report.html with the results table, the loss curves of
every stage, a CAM grid per stage (paper Figs. 3 and 6), the region maps of the learned background prompts
against the class texts (Fig. 5) with the share of their mass on background and object, where each class's
pseudo masks go wrong (spilled onto background near the object or far from it, missed) and the words nearest
to each learned prompt. run.sh runs it last.

    python tools/report.py --dataset toy --data data/toy --out out/toy --n 6
    python tools/report.py --dataset voc --out out/voc --device cuda

Reads the run folder OUT as run.sh leaves it: results.json; {cam,match,prompt,refine,seg}/log.txt;
eval_{cam,match,refine}/cams/*.npz and seed.json (the CAMs of the --split list made by the CAM network, stage (a)
and SemPLeS, and each one's best threshold); eval_{cam,match,refine}/masks/*.png and mask.json (the pseudo masks of
that list by each, made as pseudo/ makes them, and their confusion matrix); cam/args.json (S's --size and
--output_stride); prompt/prompts.pt. From the dataset: the images, the ground truth and, for a toy world,
toy_meta.json (each class's home background). Runs no network but CLIP
(--clip: the one the prompts were learned with).

Grid: the first --n images of --split, one row per class present: image | ground truth | CAM of the CAM
network | of stage (a) | of SemPLeS (viridis over the image) | pseudo mask (VOC palette). Each CAM tile
holds the IoU of that class's seed (the CAMs at the stage's best threshold from seed.json) with the ground
truth; the pseudo-mask tile that of the mask.

Prompt maps: for each class and each image of --split holding it, CLIP's patch features (ViT; --patches,
MaskCLIP's value path by default) against the class text u^f_k and the learned prompt u^b_k: a softmax over
the patches at CLIP's own logit scale (a distribution over the image), upsampled to the image. Measured:
the share of that mass on the ground-truth background and on the object, averaged over the images (and, on
a toy world, over the images whose only background is the class's home), against the share a uniform map
would give (the background's area).

Where SemPLeS's pseudo masks lose: the --losses (image, class) pairs of --split whose wrongly labelled
pixels grow most from stage (a)'s pseudo masks (eval_match/masks) to SemPLeS's (eval_refine/masks), each with the
class's pseudo-mask IoU over the list with and without that image (a dataset's IoU sums pixels over its
images, so one image can move a class by many points), and a CAM grid of those images.

Where the pseudo masks go wrong: per class and stage, from the confusion matrix in eval_*/mask.json, the
pixels labelled with the class whose truth is background (spill), those of another class, and the class's own
pixels missed, each as a multiple of the class's ground-truth area; the spill split, from the masks, into the
pixels within one cell of S's map (its --output_stride over its --size, of the image's side) of the class's own
pixels in the image, the blur of a coarse map at the object's edge, and those farther away, such as the class's
usual background, which SemPLeS's prompts are meant to take away.

Nearest words: those stage (b) kept in prompts.pt (computed here from words.txt for an older prompts.pt);
on a toy world also among the words its CLIP was trained on (classes and backgrounds), with the rank of
each class's home background word.

Writes OUT/report/grid.png, OUT/report/losses.png, OUT/report/prompt_maps.png,
OUT/report/curves_STAGE.png, OUT/report.json (every number shown) and OUT/report.html (the page; it links the
PNGs), each under a temporary name first; prints the path of report.html.
"""
import html
import json
import math
import os
import sys
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
from semples import datasets, presets, runtime
from semples.cams import load_cams, pseudo_mask
from semples.method import (WORDS, class_text_features, clip_normalise, load_frozen_clip, load_prompt_features,
                            nearest_words, read_words)
from semples.metrics import confusion_matrix, miou_from_confusion

PRESETS = presets.of("report")
STAGES = {"cam": ("eval_cam", "CAM network"), "a": ("eval_match", "stage (a)"), "c": ("eval_refine", "SemPLeS (c)")}
LOGS = ("cam", "match", "prompt", "refine", "seg")  # the training stages, in pipeline order
GAP, HEADER, LABELS = 2, 30, 84  # pixels between tiles; height of the column titles (two lines); row labels
PANEL = (300, 170)  # one loss-curve panel


def build_parser():
    p = runtime.new_parser(__doc__)
    p.add_argument("--data", type=str, default=None, help="dataset root in VOC layout (preset sets it)")
    p.add_argument("--out", type=str, default=None, help="the run folder (run.sh's --out) read, and written into")
    p.add_argument("--clip", type=str, default=None, help="CLIP model name or checkpoint path (as the run's)")
    p.add_argument("--device", type=runtime.device_name, default=runtime.default_device(), help="cuda, cuda:1 or cpu")
    p.add_argument("--split", type=str, default="train", help="image list of the eval_* folders")
    p.add_argument("--n", type=runtime.positive_int, default=6, help="images in the CAM grid")
    p.add_argument("--losses", type=runtime.positive_int, default=5,
                   help="(image, class) pairs listed where SemPLeS's pseudo masks lose most against stage (a)'s")
    p.add_argument("--per_class", type=runtime.positive_int, default=2, help="images per class in the prompt maps")
    p.add_argument("--tile", type=runtime.positive_int, default=128, help="tile size in pixels")
    p.add_argument("--map_images", type=runtime.positive_int, default=2000,
                   help="the prompt-map shares average over the first N images of --split (COCO's list is long)")
    p.add_argument("--batch_size", type=runtime.positive_int, default=64, help="images per CLIP forward")
    p.add_argument("--patches", type=str, default="value", choices=("value", "tokens"),
                   help="CLIP's patch features (clip/model.py patch_features): MaskCLIP's value path of the last "
                        "block, or the last tokens through ln_post and proj (they localise worse)")
    return p


# ----------------------------------------------------------------------------------------------
# Pictures with Pillow alone: colours, tiles, sheets of tiles, line plots
# ----------------------------------------------------------------------------------------------
# viridis (perceptually uniform, readable in grey and by colour-blind readers) at 9 even steps
VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 145, 140),
                    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], np.float64)
PALETTE = np.asarray(datasets.voc_palette(), np.uint8).reshape(256, 3)


def _font(size=11):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


FONT = _font()


def viridis(v):
    """float [...] in [0, 1] -> uint8 [..., 3], linear between the 9 anchors."""
    t = np.clip(v, 0, 1) * (len(VIRIDIS) - 1)
    i = np.minimum(t.astype(int), len(VIRIDIS) - 2)
    f = (t - i)[..., None]
    return (VIRIDIS[i] * (1 - f) + VIRIDIS[i + 1] * f).round().astype(np.uint8)


def overlay(image, v):
    """A heatmap v in [0, 1] over the image, the image still visible under it."""
    return (0.4 * image + 0.6 * viridis(v)).astype(np.uint8)


def tile(rgb, size, text=None, nearest=False):
    """uint8 [H, W, 3] scaled to fit a size x size tile (aspect kept, centred on black), `text` top left."""
    im = Image.fromarray(rgb)
    s = size / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                   Image.NEAREST if nearest else Image.BILINEAR)
    out = Image.new("RGB", (size, size))
    out.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    if text:
        d = ImageDraw.Draw(out)
        box = d.multiline_textbbox((3, 2), text, font=FONT)
        d.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
        d.multiline_text((3, 2), text, fill=(255, 255, 255), font=FONT)
    return out


def sheet(titles, rows, labels, size):
    """Tiles in a table, column titles above, each row's label on its left (not over a picture): width
    LABELS + len(titles) * (size + GAP) + GAP, height HEADER + len(rows) * (size + GAP) + GAP."""
    img = Image.new("RGB", (LABELS + len(titles) * (size + GAP) + GAP, HEADER + len(rows) * (size + GAP) + GAP),
                    "white")
    d = ImageDraw.Draw(img)
    for c, title in enumerate(titles):
        d.multiline_text((LABELS + GAP + c * (size + GAP) + 2, 2), title, fill=(0, 0, 0), font=FONT)
    for r, (row, label) in enumerate(zip(rows, labels)):
        d.multiline_text((4, HEADER + GAP + r * (size + GAP) + 2), label, fill=(0, 0, 0), font=FONT)
        for c, t in enumerate(row):
            img.paste(t, (LABELS + GAP + c * (size + GAP), HEADER + GAP + r * (size + GAP)))
    return img


def plot_curves(title, unit, series):
    """One panel per field of {field: [(step, value), ...]}, three panels a row, under a title line."""
    cols = min(3, len(series))
    img = Image.new("RGB", (cols * PANEL[0], 20 + math.ceil(len(series) / cols) * PANEL[1]), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 4), title, fill=(0, 0, 0), font=FONT)
    for n, (name, points) in enumerate(series.items()):
        x0, y0 = (n % cols) * PANEL[0], 20 + (n // cols) * PANEL[1]
        L, T, R, B = x0 + 56, y0 + 20, x0 + PANEL[0] - 12, y0 + PANEL[1] - 24
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-12:  # a flat curve: centre it
            lo, hi = lo - max(abs(lo), 1) * 1e-3, hi + max(abs(hi), 1) * 1e-3
        xy = [(L + (x - xs[0]) / max(xs[-1] - xs[0], 1) * (R - L), B - (y - lo) / (hi - lo) * (B - T))
              for x, y in points]
        d.rectangle((L, T, R, B), outline=(170, 170, 170))
        if len(xy) > 1:
            d.line(xy, fill=(33, 113, 181), width=2)
        for px, py in xy:
            d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=(33, 113, 181))
        d.text((x0 + 8, y0 + 3), f"{name}   last {ys[-1]:.4g}", fill=(0, 0, 0), font=FONT)
        d.text((x0 + 4, T - 2), f"{hi:.3g}", fill=(90, 90, 90), font=FONT)
        d.text((x0 + 4, B - 10), f"{lo:.3g}", fill=(90, 90, 90), font=FONT)
        d.text((L, B + 5), str(xs[0]), fill=(90, 90, 90), font=FONT)
        d.text(((L + R) // 2 - 12, B + 5), unit, fill=(90, 90, 90), font=FONT)
        d.text((R - 6 * len(str(xs[-1])), B + 5), str(xs[-1]), fill=(90, 90, 90), font=FONT)
    return img


def save_png(img, path):
    with runtime.atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)


# ----------------------------------------------------------------------------------------------
# What the run left: logs, seeds
# ----------------------------------------------------------------------------------------------
# Only the per-epoch lines (runtime.epoch_line) and train_seg's per-iteration lines, anchored on the
# Logger's time stamp so that "resumed ... at epoch 3/6" is not taken for one.
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (epoch|iter) (\d+)/\d+ (?:\[[\w-]+\] )?(.*)$")


def read_curves(path):
    """(unit, {field: [(step, value), ...]}) of a stage's log; `time` (wall clock) is left out. A step at or
    before the last one seen starts over from there (a resumed run re-logs from its checkpoint, a run started
    afresh from 1), so that each step keeps the value of the run that finished."""
    unit, series, last = "epoch", {}, 0
    with open(path) as f:
        for line in f:
            m = LINE.match(line.strip())
            if not m:
                continue
            unit, step, words = m.group(1), int(m.group(2)), m.group(3).split()
            if step <= last:
                series = {k: [p for p in v if p[0] < step] for k, v in series.items()}
            last = step
            for name, value in zip(words[::2], words[1::2]):
                try:
                    v = float(value)
                except ValueError:
                    continue
                if name != "time":
                    series.setdefault(name, []).append((step, v))
    return unit, {k: v for k, v in series.items() if v}


def read_json(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {what}")
    with open(path) as f:
        return json.load(f)


def class_iou(pred, gt, value):
    """IoU of one class value between a predicted map and the ground truth (255 ignored); nan if neither has it."""
    g = np.where(gt == 255, 255, gt == value).astype(np.uint8)
    return float(miou_from_confusion(confusion_matrix(g, (pred == value).astype(np.uint8), 2))[1][1])


def fmt(v, digits=2):
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def gt_tile(gt, value, size):
    """The ground truth of one class in its VOC colour (the ignore band in VOC's 255 colour, the rest black)."""
    return tile(PALETTE[np.where(gt == value, value, np.where(gt == 255, 255, 0))], size, nearest=True)


def read_pair(args, image_id):
    """(image, ground truth, class values present) of one image of the dataset."""
    gt = datasets.read_mask(os.path.join(datasets.mask_dir(args.data), f"{image_id}.png"))
    return datasets.read_image(datasets.image_path(args.data, image_id)), gt, datasets.labels_of_mask(gt)


# ----------------------------------------------------------------------------------------------
# The pictures and the pseudo-mask losses
# ----------------------------------------------------------------------------------------------
def threshold_text(t):
    """make_pseudo's --bg_threshold as its params.json holds it: a number, or the word mass."""
    return t if isinstance(t, str) else f"{t:.2f}"


def cam_grid(args, ids, names, seeds, pseudo, n):
    """Rows (image, class) of the first n images of `ids` with objects; returns (picture, rows with IoUs)."""
    titles = (["image", "ground truth"]
              + [f"{STAGES[k][1]}\nt={seeds[k]['best_threshold']:.2f}" for k in STAGES]
              + [f"pseudo mask\n(c) t={threshold_text(pseudo['bg_threshold'])}{'+CRF' if pseudo['crf'] else ''}"])
    tiles, rows = [], []
    for i in ids:
        image, gt, present = read_pair(args, i)
        if not present:
            continue
        stage_cams = {k: load_cams(os.path.join(args.out, d, "cams", f"{i}.npz")) for k, (d, _) in STAGES.items()}
        pm = datasets.read_mask(os.path.join(args.out, "eval_refine", "masks", f"{i}.png"))
        for v in present:
            iou, row = {}, [tile(image, args.tile), gt_tile(gt, v, args.tile)]
            for k, (cams, classes) in stage_cams.items():
                seed = pseudo_mask(cams, classes, seeds[k]["best_threshold"])  # the seed as eval_miou scores it
                iou[k] = class_iou(seed, gt, v)
                heat = overlay(image, cams[list(classes).index(v)])
                row.append(tile(heat, args.tile, f"IoU {fmt(100 * iou[k], 1)}"))
            iou["pseudo"] = class_iou(pm, gt, v)
            row.append(tile(PALETTE[pm], args.tile, f"IoU {fmt(100 * iou['pseudo'], 1)}", nearest=True))
            tiles.append(row)
            rows.append({"id": i, "class": names[v - 1], "iou": {k: 100 * x for k, x in iou.items()}})
        if len({r["id"] for r in rows}) == n:
            break
    return sheet(titles, tiles, [f"{r['id']}\n{r['class']}" for r in rows], args.tile), rows


def pseudo_losses(args, ids, names, k):
    """The k (image, class) pairs whose wrongly labelled pixels (the class predicted or true, not both) grow
    most from stage (a)'s pseudo masks to SemPLeS's, each with the class's IoU over `ids` for both and for
    SemPLeS without that image. Object classes only: a class that eats the background shows up as itself."""
    K = len(names) + 1
    per = np.zeros((len(ids), 2, 2, K), np.int64)  # image x [stage (a), SemPLeS] x [intersection, union] x class
    for n, i in enumerate(ids):
        gt = datasets.read_mask(os.path.join(datasets.mask_dir(args.data), f"{i}.png"))
        for s, d in enumerate(("eval_match", "eval_refine")):
            path = os.path.join(args.out, d, "masks", f"{i}.png")
            conf = confusion_matrix(gt, datasets.read_mask(path), K, where=path)  # 255 ignored, sizes checked
            tp = np.diag(conf)
            per[n, s] = tp, conf.sum(0) + conf.sum(1) - tp
    total = per.sum(0)
    errors = per[:, :, 1, 1:] - per[:, :, 0, 1:]  # union - intersection, [image, stage, object class]
    extra = (errors[:, 1] - errors[:, 0]).ravel()
    order = np.argsort(-extra, kind="stable")[:k]  # ties in list order
    iou = lambda iu: 100 * float(iu[0]) / float(iu[1]) if iu[1] else None
    rows = []
    for j in order[extra[order] > 0]:
        n, v = divmod(int(j), K - 1)
        v += 1
        rows.append({"id": ids[n], "class": names[v - 1], "extra_errors": int(extra[j]),
                     "iou_a": iou(total[0, :, v]), "iou_c": iou(total[1, :, v]),
                     "iou_c_without": iou(total[1, :, v] - per[n, 1, :, v])})
    return rows


def error_breakdown(args, ids, names):
    """Where each stage's pseudo masks of the list go wrong, per class, from the confusion matrix (rows ground
    truth, columns prediction) that the seeds step's eval_miou.py keeps in eval_*/mask.json: the pixels
    labelled k whose truth is background ("spill"), those whose truth is another class, and k's own pixels
    labelled anything else ("missed"), each as a multiple of k's ground-truth area. The spill is split by
    spill_near_far (below) into what lies within one cell of S's map of k's own pixels and what lies farther."""
    rows = {n: {} for n in names}
    near_far = spill_near_far(args, ids, names, map_cell(args.out))
    for stage, (d, _) in STAGES.items():
        path = os.path.join(args.out, d, "mask.json")
        m = read_json(path, "run.sh's seeds step writes it")
        if m.get("class_names") != ["background"] + list(names):
            raise ValueError(f"{path} scores classes {m.get('class_names')}, the dataset has {names}: rerun run.sh")
        conf = np.asarray(m["confusion"], np.int64)
        for v, n in enumerate(names, 1):
            area = int(conf[v].sum())
            rows[n]["area"] = area
            rows[n][stage] = None if area == 0 else {
                "spill": float(conf[0, v]) / area, "spill_near": float(near_far[stage][0, v]) / area,
                "spill_far": float(near_far[stage][1, v]) / area,
                "other": float(conf[1:, v].sum() - conf[v, v]) / area, "missed": float(area - conf[v, v]) / area}
    return rows


def map_cell(out):
    """One cell of S's map as a share of the image's side: S sees the image resized to --size and maps it at
    --output_stride (the CAM network's args.json; stages (a) and (c) rebuild the same S)."""
    a = read_json(os.path.join(out, "cam", "args.json"), "train_cam.py writes it")
    return a["output_stride"] / a["size"]


def spill_near_far(args, ids, names, cell):
    """Each stage's spill (pixels labelled k whose truth is background) split by where it lies: within one
    cell of S's map (`cell` of the image's height and width, each way) of k's own ground-truth pixels in the
    image, or farther. The first is the blur of a coarse map at the object's edge, which no loss on whole
    masked images can place; the second a region lit away from the object, such as the class's usual
    background: what SemPLeS's background prompts are meant to take away. {stage: counts [near, far] x class
    value}."""
    counts = {k: np.zeros((2, len(names) + 1), np.int64) for k in STAGES}
    for i in ids:
        gt = datasets.read_mask(os.path.join(datasets.mask_dir(args.data), f"{i}.png"))
        ry, rx = (math.ceil(cell * side) for side in gt.shape)
        near = {}  # class value -> pixels within one cell of its ground truth, shared by the stages
        for stage, (d, _) in STAGES.items():
            path = os.path.join(args.out, d, "masks", f"{i}.png")
            pm = datasets.read_mask(path)
            if pm.shape != gt.shape:
                raise ValueError(f"{path} is {pm.shape}, its ground truth {gt.shape}: rerun run.sh's seeds step")
            for v in np.unique(pm[gt == 0]):
                if v == 0 or v > len(names):
                    continue
                if v not in near:  # a box dilation, one axis at a time
                    own = torch.from_numpy(gt == v).float()[None, None]
                    own = F.max_pool2d(F.max_pool2d(own, (1, 2 * rx + 1), 1, (0, rx)), (2 * ry + 1, 1), 1, (ry, 0))
                    near[v] = own[0, 0].numpy() > 0
                spill = (gt == 0) & (pm == v)
                counts[stage][:, v] += int((spill & near[v]).sum()), int((spill & ~near[v]).sum())
    return counts


@torch.no_grad()
def patch_softmax(clip_model, images, texts, device, dense):
    """For each image (uint8 [H, W, 3]) and text feature [T, D]: a softmax over CLIP's patches of
    logit_scale * cos(patch feature, text), [B, T, g, g]. The logit scale is CLIP's own (how sharply it
    tells apart what it compares), so the map is where CLIP would say the text is."""
    r = clip_model.visual.input_resolution
    x = torch.cat([F.interpolate(torch.tensor(im).permute(2, 0, 1)[None].float() / 255, (r, r),
                                 mode="bilinear", align_corners=False) for im in images]).to(device)
    p = F.normalize(clip_model.encode_image_patches(clip_normalise(x), dense).float(), dim=-1)
    g = math.isqrt(p.shape[1])
    logits = clip_model.logit_scale.exp() * p @ texts.t()  # [B, g*g, T]
    return logits.softmax(1).transpose(1, 2).reshape(len(images), len(texts), g, g).cpu()


def on_image(grid_map, gt):
    """A map over the patch grid upsampled to the image, as a distribution over its labelled pixels."""
    full = F.interpolate(grid_map[None, None], gt.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    full = full * (gt != 255)
    return full / full.sum()


def prompt_maps(args, ids, names, clip_model, u_f, u_b, device, meta):
    """Per class, means over the (image, class) pairs of the split: the shares of the u^f and u^b maps on
    the background and on the object, the background's area; on a toy world the same over the images whose
    only background is the class's home. Also the picture of the first --per_class images of each class."""
    K, texts = len(names), torch.cat([u_f, u_b])
    home, regions = (meta or {}).get("home", {}), {i: m["regions"] for i, m in (meta or {}).get("images", {}).items()}
    values = {name: {} for name in names}  # class -> measure -> one value per pair
    shown, ids_shown = {name: [] for name in names}, {name: [] for name in names}
    for start in range(0, len(ids), args.batch_size):
        batch = ids[start:start + args.batch_size]
        pairs = [read_pair(args, i) for i in batch]
        maps = patch_softmax(clip_model, [p[0] for p in pairs], texts, device, args.patches)
        for i, (image, gt, present), m in zip(batch, pairs, maps):
            for v in present:
                name, seen = names[v - 1], {"uf": on_image(m[v - 1], gt), "ub": on_image(m[K + v - 1], gt)}
                row = {"bg_area": (gt == 0).sum() / (gt != 255).sum(), "obj_area": (gt == v).sum() / (gt != 255).sum()}
                for w, full in seen.items():
                    row[f"{w}_bg"], row[f"{w}_obj"] = full[gt == 0].sum(), full[gt == v].sum()
                if name in home and regions.get(i) == [home[name]]:  # its only background is the home one
                    row.update(home_area=row["bg_area"], uf_home=row["uf_bg"], ub_home=row["ub_bg"])
                for key, x in row.items():
                    values[name].setdefault(key, []).append(float(x))
                if len(shown[name]) < 4 * args.per_class:  # 4 tiles an image
                    ids_shown[name].append(i)
                    shown[name] += [tile(image, args.tile), gt_tile(gt, v, args.tile)] + [
                        tile(overlay(image, full / full.max()), args.tile,
                             f"bg {row[f'{w}_bg']:.2f}\nobj {row[f'{w}_obj']:.2f}") for w, full in seen.items()]
    shares = {name: {"pairs": len(v.get("bg_area", [])), "home": home.get(name),
                     "home_pairs": len(v.get("home_area", [])), **{k: float(np.mean(x)) for k, x in v.items()}}
              for name, v in values.items()}
    titles = ["image", "ground truth", "class text\nu^f", "learned prompt\nu^b"] * args.per_class
    blank = Image.new("RGB", (args.tile, args.tile), "white")  # a class with fewer images than --per_class
    rows = [t + [blank] * (4 * args.per_class - len(t)) for t in shown.values() if t]
    labels = [f"{n}\n" + (f"home: {home[n]}\n" if n in home else "") + "\n".join(ids_shown[n]) for n in names
              if shown[n]]
    return sheet(titles, rows, labels, args.tile), shares


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------
def table(head, rows):
    cell = lambda tag, c: f"<{tag}>{html.escape(str(c))}</{tag}>"
    return ("<table><tr>" + "".join(cell("th", c) for c in head) + "</tr>"
            + "".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows) + "</table>")


SHARES = ("bg_area", "ub_bg", "uf_bg", "obj_area", "ub_obj", "uf_obj", "home_area", "ub_home", "uf_home")


def words_table(near, home):
    """class | home | the nearest words with their cosine, best first."""
    return table(["class", "home"] + [str(j + 1) for j in range(max(len(v) for v in near.values()))],
                 [[n, home.get(n, "")] + [f"{w} {c:.3f}" for w, c in pairs] for n, pairs in near.items()])


def results_section(rep, names):
    res, seeds = rep["results"], rep["seeds"]
    seg = res.get("segmenter_val_miou")
    seg = "not run (--no-seg)" if seg is None else fmt(seg)
    return ["<h2>Results (mIoU %)</h2>",
            table(["", "seed (CAM), train", "best threshold", "pseudo mask, train"],
                  [[STAGES[k][1]] + [fmt(res[k][n]) for n in ("seed_miou", "seed_threshold", "pseudo_miou")]
                   for k in STAGES] + [["segmenter on pseudo masks, val", "", "", seg]]),
            "<h3>Seed IoU per class (%, each stage at its best threshold)</h3>",
            table(["class"] + [STAGES[k][1] for k in STAGES],
                  [[n] + [fmt(seeds[k]["iou"].get(n)) for k in STAGES] for n in ["background"] + names])]


def grid_section(rep):
    return ["<h2>CAMs per stage (paper Figs. 3, 6)</h2>",
            "<p>One row per (image, class): the class's CAM of each stage in viridis over the image, with the "
            "IoU of its seed at the stage's best threshold; SemPLeS's pseudo mask in the VOC palette.</p>",
            f'<p><img src="{html.escape(rep["grid"]["png"])}" alt="CAM grid"></p>',
            table(["image", "class"] + [STAGES[k][1] for k in STAGES] + ["pseudo mask"],
                  [[r["id"], r["class"]] + [fmt(r["iou"][k]) for k in list(STAGES) + ["pseudo"]]
                   for r in rep["grid"]["rows"]])]


def losses_section(rep):
    rows = rep["losses"]["rows"]
    parts = ["<h2>Where SemPLeS's pseudo masks lose against stage (a)'s</h2>",
             "<p>The (image, class) pairs whose wrongly labelled pixels grow most from stage (a)'s pseudo masks "
             "to SemPLeS's, with the class's pseudo-mask IoU over the list; a dataset's IoU sums pixels over "
             "its images, so one image can move a class by many points.</p>"]
    if not rows:
        return parts + ["<p>None: SemPLeS's pseudo masks have no more wrong pixels than stage (a)'s for any "
                        "(image, class).</p>"]
    return parts + [f'<p><img src="{html.escape(rep["losses"]["png"])}" alt="losses"></p>',
                    table(["image", "class", "extra wrong pixels", "IoU stage (a)", "IoU SemPLeS",
                           "IoU SemPLeS without this image"],
                          [[r["id"], r["class"], r["extra_errors"]] + [fmt(r[k]) for k in
                                                                      ("iou_a", "iou_c", "iou_c_without")]
                           for r in rows])]


def errors_section(rep):
    err = rep["errors"]
    kinds = {"spill_near": "spill within a cell", "spill_far": "spill farther", "other": "other", "missed": "missed"}
    cols = [(kind, k) for kind in kinds for k in STAGES]
    return ["<h2>Where the pseudo masks go wrong, per class</h2>",
            "<p>From each stage's pseudo masks of the list (eval_*/mask.json and the masks), as multiples of the "
            "class's ground-truth area: <b>spill</b>, pixels labelled with the class that are background, split "
            "into those <b>within a cell</b> of S's map of the class's own pixels in the image (the blur of a coarse "
            "map at the object's edge) and those <b>farther</b> (a region lit away from the object, such as the "
            "class's usual background: what SemPLeS's prompts are meant to take away); <b>other</b>, pixels of "
            "other classes labelled with it; <b>missed</b>, its own pixels labelled otherwise.</p>",
            table(["class", "ground-truth pixels"] + [f"{kinds[kind]}, {STAGES[k][1]}" for kind, k in cols],
                  [[n, e["area"]] + [fmt(None if e[k] is None else e[k][kind], 3) for kind, k in cols]
                   for n, e in err.items()])]


def maps_section(rep):
    maps = rep["prompt_maps"]
    if maps["png"] is None:
        return ["<h2>Where the learned prompts look</h2><p>Not drawn: this CLIP is not a ViT (no patch tokens).</p>"]
    return ["<h2>Where the learned prompts look (paper Fig. 5)</h2>",
            f"<p>A softmax over CLIP's patches ({maps['patches']} features) of {maps['logit_scale']:.1f} x "
            "cos(patch, text): where the class text u^f and the learned background prompt u^b sit in the image, "
            "and the share of that mass on the ground-truth background and on the object (mean over the first "
            f"{maps['images']} images, one (image, class) pair each). The areas are what a uniform map would put "
            "there. A prompt that describes the class's background puts more than its area there; one that "
            "describes the object, less.</p>",
            f'<p><img src="{html.escape(maps["png"])}" alt="prompt maps"></p>',
            table(["class", "images", "bg area", "u^b on bg", "u^f on bg", "object area", "u^b on object",
                   "u^f on object", "home", "images home only", "home area", "u^b on home", "u^f on home"],
                  [[n, s["pairs"]] + [fmt(s.get(k), 3) for k in SHARES[:6]] + [s["home"] or "", s["home_pairs"]]
                   + [fmt(s.get(k), 3) for k in SHARES[6:]] for n, s in maps["classes"].items()])]


def words_section(rep):
    parts = [f"<h2>Nearest words to each learned prompt</h2><p>{html.escape(rep['nearest_words_source'])}</p>",
             words_table(rep["nearest_words"], rep["home"])]
    if rep.get("prompt_fit"):
        fit = rep["prompt_fit"]
        parts += ["<p>How well each learned prompt matches the backgrounds it was learned from (stage b's mean cosine "
                  "with their v^b), against the class text's (the co-occurrence bias: how much they still look like "
                  "the class), the prompt's cosine with the class text (what L_prompt^T lowers), and how far stage "
                  "(c)'s L_refine reaches from it: the mean cosine of stage (a)'s foregrounds v^f with u^b, and the "
                  "share of pairs where that cosine is above sim()'s clamp floor, the only pairs L_refine moves "
                  "(prompts learned before stage b kept these show none):</p>",
                  table(["class", "pairs", "u^b fit", "class text fit", "cos(u^b, u^f)", "cos(v^f, u^b)",
                         "pairs L_refine moves"],
                        [[n, f["pairs"], fmt(f["u_b"], 3), fmt(f["u_f"], 3), fmt(rep["prompt_class_cosine"][n], 3),
                          fmt(f.get("refine_cos"), 3), fmt(f.get("refine_live"), 2)] for n, f in fit.items()])]
    if "nearest_words_toy" in rep:
        parts += ["<p>The toy CLIP saw only the words of its captions (the class names and the backgrounds); "
                  "every other word reaches it through untrained token embeddings. Among those words:</p>",
                  words_table(rep["nearest_words_toy"], rep["home"]),
                  f"<p>Where each class's home background word ranks among them (rank of {len(rep['toy_vocabulary'])}"
                  ", cosine): " + ", ".join(f"{n}: {rep['home'][n]} {r} ({c:.3f})"
                                            for n, (r, c) in rep["home_word_rank"].items()) + "</p>"]
    return parts


def page(rep, names):
    res = rep["results"]
    parts = [f"<h1>SemPLeS run {html.escape(rep['run'])}</h1>",
             f"<p>dataset {html.escape(str(res.get('dataset')))}, seed {res.get('seed')}; report.json holds every "
             "number below.</p>"] + results_section(rep, names) + ["<h2>Loss curves</h2>"]
    parts += [f'<p><img src="{html.escape(p)}" alt="{s}"></p>' for s, p in rep["curves"].items()]
    parts += grid_section(rep) + losses_section(rep) + errors_section(rep) + maps_section(rep) + words_section(rep)
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto} table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>SemPLeS report</title><style>{style}</style>"
            "</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def main(args):
    device, _, _ = runtime.setup_device(args.device)
    names = datasets.read_class_names(args.data, args.dataset)
    out, folder = args.out, os.path.join(args.out, "report")
    results = read_json(os.path.join(out, "results.json"), "run bash run.sh first (it writes it)")
    seeds = {k: read_json(os.path.join(out, d, "seed.json"), "run.sh's seeds step writes it") for k, (d, _) in
             STAGES.items()}
    pseudo = read_json(os.path.join(out, "eval_refine", "masks", "params.json"), "make_pseudo.py writes it")
    ids = datasets.read_ids(args.data, args.split)
    meta_path = os.path.join(args.data, "toy_meta.json")
    meta = read_json(meta_path, "") if os.path.exists(meta_path) else None
    runtime.make_dir(folder, "--out")

    rep = {"run": os.path.abspath(out), "results": results, "seeds": {k: {
        "best_threshold": s["best_threshold"], "miou": s["miou"], "iou": s["iou"]} for k, s in seeds.items()},
        "curves": {}}
    for stage in LOGS:
        if stage == "seg" and results.get("segmenter_val_miou") is None:
            continue  # --no-seg: a seg/ folder there is from an earlier run
        path = os.path.join(out, stage, "log.txt")
        unit, series = read_curves(path) if os.path.exists(path) else ("epoch", {})
        if series:
            save_png(plot_curves(f"{stage}: {', '.join(series)} per {unit}", unit, series),
                     os.path.join(folder, f"curves_{stage}.png"))
            rep["curves"][stage] = f"report/curves_{stage}.png"

    grid, rows = cam_grid(args, ids, names, seeds, pseudo, args.n)
    save_png(grid, os.path.join(folder, "grid.png"))
    rep["grid"] = {"png": "report/grid.png", "rows": rows}
    rep["errors"] = error_breakdown(args, ids, names)
    losses = pseudo_losses(args, ids, names, args.losses)
    rep["losses"] = {"png": None, "rows": losses}
    loss_png = os.path.join(folder, "losses.png")
    if losses:
        loss_ids = list(dict.fromkeys(r["id"] for r in losses))
        save_png(cam_grid(args, loss_ids, names, seeds, pseudo, len(loss_ids))[0], loss_png)
        rep["losses"]["png"] = "report/losses.png"
    elif os.path.exists(loss_png):  # an earlier report's: this run's masks lose nowhere
        os.remove(loss_png)

    clip_model = load_frozen_clip(args.clip, device)
    prompts_path = os.path.join(out, "prompt", "prompts.pt")
    u_b = load_prompt_features(prompts_path, clip_model, names, "--out")
    u_f = class_text_features(clip_model, names)
    rep["home"] = (meta or {}).get("home", {})
    rep["prompt_maps"] = {"png": None, "logit_scale": float(clip_model.logit_scale.exp()), "patches": args.patches,
                          "images": min(len(ids), args.map_images), "classes": {}}
    if hasattr(clip_model.visual, "patch_features"):  # a ViT; a ResNet CLIP has no patch tokens to read
        picture, shares = prompt_maps(args, ids[:args.map_images], names, clip_model, u_f, u_b, device, meta)
        save_png(picture, os.path.join(folder, "prompt_maps.png"))
        rep["prompt_maps"].update(png="report/prompt_maps.png", classes=shares)
    prompt_ckpt = runtime.load_checkpoint(prompts_path, "prompts", "--out")
    rep["prompt_fit"] = prompt_ckpt.get("fit")  # None: prompts learned before train_prompt.py kept it
    rep["prompt_class_cosine"] = dict(zip(names, (u_b * u_f).sum(-1).tolist()))
    near = prompt_ckpt.get("nearest_words")
    rep["nearest_words_source"] = "from prompts.pt (stage b's log lists them too)"
    if near is None:  # prompts learned before train_prompt.py kept them
        near = dict(zip(names, nearest_words(clip_model, u_b, read_words(WORDS), 5)))
        rep["nearest_words_source"] = "computed here with words.txt (this prompts.pt predates nearest_words)"
    rep["nearest_words"] = near
    if meta:  # the toy CLIP learned only the words of its captions: the classes and the backgrounds
        vocab = list(meta["class_names"]) + list(meta["backgrounds"])
        ranked = dict(zip(names, nearest_words(clip_model, u_b, vocab, len(vocab))))
        rep["toy_vocabulary"], rep["nearest_words_toy"] = vocab, {n: r[:5] for n, r in ranked.items()}
        rep["home_word_rank"] = {n: next([j + 1, c] for j, (w, c) in enumerate(r) if w == meta["home"].get(n))
                                 for n, r in ranked.items() if n in meta["home"]}  # [rank, cosine]

    with runtime.atomic_path(os.path.join(out, "report.json")) as tmp, open(tmp, "w") as f:
        json.dump(rep, f, indent=1)
    with runtime.atomic_path(os.path.join(out, "report.html")) as tmp, open(tmp, "w") as f:
        f.write(page(rep, names))
    print(f"wrote {os.path.join(out, 'report.html')}: {len(rows)} grid rows, {len(losses)} pseudo-mask losses, "
          f"{len(rep['prompt_maps']['classes'])} classes' prompt maps, {len(rep['curves'])} loss-curve pictures "
          f"in {folder}")
    return rep


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
