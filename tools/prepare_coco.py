"""MS COCO 2014 in the VOC layout the stages read (`--dataset coco`, `--data data/coco`), made from COCO's
instance annotations.

    python tools/prepare_coco.py --coco_root data/coco2014 --out data/coco

Reads COCO_ROOT/train2014/*.jpg, COCO_ROOT/val2014/*.jpg and COCO_ROOT/annotations/instances_{train,val}2014.json
(train2014.zip, val2014.zip and annotations_trainval2014.zip from cocodataset.org, extracted). Writes into OUT:

- OUT/JPEGImages/{id}.jpg: a symbolic link to the COCO image, not a copy. The link is relative (computed between
  the real paths of both folders), so moving data/ as a whole, with both folders in it, keeps it valid; moving
  only one of them breaks it (rerun: a dangling link is replaced, a working one kept).
- OUT/SegmentationClass/{id}.png: class-index PNG in the VOC palette, 0 background, 1..80 the categories.
- OUT/ImageSets/Segmentation/train_aug.txt and train.txt (both: every train2014 id), val.txt (every val2014 id).
- OUT/prepare_coco.json: the settings the masks were drawn with (--crowd, the category list); a rerun with other
  settings into the same OUT is refused.

An id is the image file's name stem, e.g. COCO_train2014_000000000009; lists are sorted.

Conventions: those of alicranck/coco2voc, the converter the WSSS code bases (ToCo, DuPL and others) point to for
COCO's masks, except for its raw category ids:

- Classes: the file's categories in ascending category id take 1..K. COCO's ids run 1..90 with 10 unused, so
  person (id 1) is 1 and toothbrush (id 90) is 80, never 90: a mask holding raw ids (as coco2voc's do) needs 91
  classes, 10 of which never occur (NaN IoU: the "street sign" row of hustvl/WeakTr issue 20). With all 80
  categories the mapped names must equal semples.datasets.COCO_CLASSES (checked). Background and unannotated
  pixels are 0.
- Overlaps: instances are drawn in order of decreasing area (pixels of the decoded mask; equal areas in file
  order, the later drawn last), so a smaller object lying on a larger one stays visible (a person on a couch, a
  cup on a table) instead of being painted over; coco2voc does the same (smallest first, first one wins).
- Crowds (iscrowd 1, RLE regions of many instances): --crowd class (default) draws them with their category like
  any instance, as coco2voc does (it reads every annotation, crowds included); it keeps the WSSS masks and the
  image-level labels derived from them (here: every class present in the mask) as the literature has them, and an
  image whose only person is a crowd still has the label person. --crowd ignore draws them 255 (ignored in
  training and scoring, the detection benchmark's view of crowds); their image-level label is then lost unless the
  image holds another instance of the class. Either way a crowd takes its place in the area order like any
  instance.
- Decoding: pycocotools.mask for polygons (all parts of one instance merged), uncompressed RLE (counts a list, as
  COCO's crowd annotations are) and compressed RLE (counts a string). Polygons with fewer than 3 points cover no
  area and are dropped (counted; pycocotools would read a 4-number polygon as a box).
- Images without any annotation are kept, with an all-background mask (coco2voc writes none for them): the lists
  hold all 82,783 train2014 and 40,504 val2014 images, as the literature's train set is all of train2014; our
  loaders leave an image whose mask holds no class out of training (it has no image-level label), and in scoring
  its pixels count as background. --skip_unannotated lists (and draws) only images with at least one annotation,
  crowd ones included (to our knowledge the 82,081 / 40,137 images some papers quote); links and masks an earlier
  full run made stay on disk, listed nowhere.

Resumable: a mask or link that exists is kept (a mask is written under a temporary name and renamed, so a killed
run leaves no half file; the temporary files it left are removed at the next start); lists are rewritten only when
their content changes. A second run writes nothing. A run holds OUT (runtime.hold_folder): a second run into the
same OUT at the same time is refused.

Cost, measured on synthetic data of COCO's sizes: one annotation file in memory at a time, about 6x its size on
disk as Python objects (train2014's, some 330 MB, about 2 GB; plus about 0.5 GB of imports), and one image's masks;
about 10 ms an image (640x480, 7 polygons: decoding and the PNG), so some 20 minutes for all 123,287 images.
"""
import json
import os
import sys

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
from semples import datasets, runtime

SPLITS = (("train", "train2014"), ("val", "val2014"))  # our split: COCO's image folder and annotation file
LISTS = {"train": ("train_aug", "train"), "val": ("val",)}
RECORD = "prepare_coco.json"
VERSION = 1
IGNORE = 255
DOWNLOAD = {"train2014": "train2014.zip", "val2014": "val2014.zip", "annotations": "annotations_trainval2014.zip"}


def build_parser():
    p = runtime.new_parser(__doc__)
    p.add_argument("--coco_root", type=str, default=os.path.join(runtime.REPO, "data", "coco2014"),
                   help="COCO 2014 extracted: train2014/, val2014/, annotations/instances_{train,val}2014.json")
    p.add_argument("--out", type=str, default=os.path.join(runtime.REPO, "data", "coco"),
                   help="the VOC-layout folder to write (the coco preset's --data)")
    p.add_argument("--crowd", choices=("class", "ignore"), default="class",
                   help="iscrowd regions: drawn with their category (class) or 255 (ignore)")
    p.add_argument("--skip_unannotated", action="store_true",
                   help="leave images without any annotation out of the lists (and write no mask or link for them)")
    return p


# ----------------------------------------------------------------------------------------------
# Reading the inputs
# ----------------------------------------------------------------------------------------------

def inputs(root):
    """{split: (image folder, annotation file)}, every one checked before anything is read or written."""
    hint = "pass --coco_root the folder holding COCO 2014's train2014/, val2014/ and annotations/"
    runtime.need_dir(root, "--coco_root folder", hint)
    if not os.path.isdir(os.path.join(root, "annotations")):
        for inner in ("coco", "coco2014", "COCO", "COCO2014"):
            if os.path.isdir(os.path.join(root, inner, "annotations")):
                raise FileNotFoundError(f"--coco_root {root} has no annotations/ folder but {inner}/annotations: pass "
                                        f"--coco_root {os.path.join(root, inner)}")
    found = {}
    for split, folder in SPLITS:
        images = runtime.need_dir(os.path.join(root, folder), "--coco_root: image folder",
                          f"extract {DOWNLOAD[folder]} (cocodataset.org) into {root}")
        ann = runtime.need_file(os.path.join(root, "annotations", f"instances_{folder}.json"), "--coco_root: annotation file",
                        f"extract {DOWNLOAD['annotations']} (cocodataset.org) into {root}; it holds "
                        f"annotations/instances_{folder}.json")
        found[split] = (images, ann)
    return found


def read_instances(path):
    """The JSON of an instances file, its three lists checked to be there."""
    hint = f"replace it with instances_*.json from {DOWNLOAD['annotations']}"
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"annotation file {path} is not valid JSON ({e}): {hint}") from None
    except OSError as e:
        raise ValueError(f"annotation file {path} cannot be read ({e.strerror}): {hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path} holds a JSON {type(data).__name__}, not COCO's object with "
                         f"'images', 'annotations' and 'categories': {hint}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "has no" if key not in data else "has a non-list"
            raise ValueError(f"annotation file {path} {what} '{key}' list: it is not an instance annotation file "
                             f"(captions_* and person_keypoints_* are not); {hint}")
    if not data["categories"]:
        raise ValueError(f"annotation file {path} has an empty 'categories' list: {hint}")
    return data


def _int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def categories(cats, path):
    """[[category id, name], ...] in ascending id: the one at position k takes mask value k + 1."""
    hint = f"replace it with instances_*.json from {DOWNLOAD['annotations']}"
    pairs = []
    for c in cats:
        if not (isinstance(c, dict) and _int(c.get("id")) and isinstance(c.get("name"), str)):
            raise ValueError(f"annotation file {path}: category {str(c)[:80]} lacks an integer 'id' or a 'name': "
                             f"{hint}")
        pairs.append([c["id"], c["name"]])
    pairs.sort()
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"annotation file {path} lists category id {dup} twice: {hint}")
    if len(pairs) >= IGNORE:
        raise ValueError(f"annotation file {path} has {len(pairs)} categories; a class-index PNG holds at most "
                         f"{IGNORE - 1} (255 is the ignored value)")
    names = [n for _, n in pairs]
    if len(pairs) == len(datasets.COCO_CLASSES) and names != datasets.COCO_CLASSES:
        k = next(k for k in range(len(names)) if names[k] != datasets.COCO_CLASSES[k])
        raise ValueError(f"annotation file {path}: its 80 categories in ascending id do not match "
                         f"semples.datasets.COCO_CLASSES (class {k + 1}: category {pairs[k][0]} '{names[k]}', expected "
                         f"'{datasets.COCO_CLASSES[k]}'); the stages name the classes by that list: {hint}")
    return pairs


def index(data, path, cat_value):
    """{image id: image entry}, {image id: [annotations]} with every reference checked."""
    hint = f"replace it with instances_*.json from {DOWNLOAD['annotations']}"
    images, anns = {}, {}
    for im in data["images"]:
        if not (isinstance(im, dict) and _int(im.get("id")) and isinstance(im.get("file_name"), str)
                and _int(im.get("height")) and _int(im.get("width")) and im["height"] > 0 and im["width"] > 0):
            raise ValueError(f"annotation file {path}: image entry {str(im)[:100]} lacks an integer 'id', a "
                             f"'file_name' or a positive 'height' and 'width': {hint}")
        if im["id"] in images:
            raise ValueError(f"annotation file {path} lists image id {im['id']} twice: {hint}")
        images[im["id"]] = im
        anns[im["id"]] = []
    known = ", ".join(str(i) for i in sorted(cat_value))
    for a in data["annotations"]:
        if not (isinstance(a, dict) and "segmentation" in a):
            raise ValueError(f"annotation file {path}: annotation {str(a)[:100]} has no 'segmentation': {hint}")
        aid = a.get("id", "?")
        if a.get("category_id") not in cat_value:
            raise ValueError(f"annotation file {path}: annotation {aid} has category id {a.get('category_id')!r}, "
                             f"which is not among the file's categories ({known}): {hint}")
        if a.get("image_id") not in anns:
            raise ValueError(f"annotation file {path}: annotation {aid} names image id {a.get('image_id')!r}, which "
                             f"is not among the file's images: {hint}")
        anns[a["image_id"]].append(a)
    return images, anns


# ----------------------------------------------------------------------------------------------
# Drawing one image's mask
# ----------------------------------------------------------------------------------------------
def to_rle(segm, h, w, where):
    """One instance's region as a pycocotools RLE (None if it covers nothing) and the number of polygons dropped
    for having fewer than 3 points."""
    if isinstance(segm, list):  # polygons: all parts of the instance
        polys = []
        for p in segm:
            if not (isinstance(p, list) and len(p) % 2 == 0
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)):
                raise ValueError(f"{where}: a polygon must be a flat list of x, y numbers, found {str(p)[:80]}")
            if len(p) >= 6:
                polys.append([float(v) for v in p])
        dropped = len(segm) - len(polys)
        if not polys:
            return None, dropped
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w)), dropped
    if not (isinstance(segm, dict) and "counts" in segm and "size" in segm):
        raise ValueError(f"{where}: 'segmentation' is neither a polygon list nor an RLE with 'counts' and 'size'")
    if list(segm["size"]) != [h, w]:
        raise ValueError(f"{where}: its RLE is {segm['size']} (h, w) but the image entry says [{h}, {w}]")
    counts = segm["counts"]
    if isinstance(counts, list):  # uncompressed RLE: alternating run lengths, column-major, background first
        if not all(_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise ValueError(f"{where}: its uncompressed RLE counts must be integers >= 0 summing to h * w = {h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w), 0
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if not isinstance(counts, str):
        raise ValueError(f"{where}: RLE counts must be a list (uncompressed) or a string (compressed)")
    runs = string_runs(counts)  # compressed RLE, COCO's string form: checked, since pycocotools' decoder
    if runs is None or min(runs, default=0) < 0 or sum(runs) != h * w:  # writes past its buffer on bad runs
        raise ValueError(f"{where}: its compressed RLE counts do not decode to run lengths >= 0 summing to h * w = "
                         f"{h * w}")
    return {"size": [h, w], "counts": counts.encode("ascii")}, 0


def string_runs(s):
    """The run lengths of a compressed RLE string (pycocotools' rleFrString in Python), None if malformed."""
    runs, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s) or not 48 <= ord(s[p]) < 48 + 64:
                return None
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << 5 * k
            more = c & 0x20
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def draw(anns, h, w, cat_value, crowd, path):
    """The class-index map of one image; returns (mask, polygons dropped)."""
    items, dropped = [], 0
    for a in anns:
        where = f"annotation file {path}: annotation {a.get('id', '?')}"
        rle, n = to_rle(a["segmentation"], h, w, where)
        dropped += n
        if rle is None:
            continue
        try:
            area = int(mask_utils.area(rle))
        except Exception as e:  # pycocotools raises ValueError or its own errors on a malformed string
            raise ValueError(f"{where}: its RLE cannot be decoded ({e})") from None
        value = IGNORE if crowd == "ignore" and a.get("iscrowd") else cat_value[a["category_id"]]
        items.append((area, rle, value, where))
    items.sort(key=lambda t: -t[0])  # larger first, so smaller instances are drawn over them; stable on ties
    mask = np.zeros((h, w), np.uint8)
    for _, rle, value, where in items:
        m = mask_utils.decode(rle)
        if m.shape != (h, w):
            raise ValueError(f"{where}: its region decodes to {m.shape}, not the image's ({h}, {w})")
        mask[m.astype(bool)] = value
    return mask, dropped


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def link(src, dst):
    """A relative symbolic link dst -> src: 'made', 'kept' (dst exists and resolves) or 'replaced' (dangling)."""
    state = "made"
    if os.path.lexists(dst):
        if os.path.exists(dst):
            return "kept"
        os.remove(dst)  # a dangling link: the images moved
        state = "replaced"
    os.symlink(os.path.relpath(os.path.realpath(src), os.path.realpath(os.path.dirname(dst))), dst)
    return state


def check_record(out, record, settings, source):
    """OUT's masks must all be drawn alike: the settings an earlier run (or split) recorded must be this one's."""
    path = os.path.join(out, RECORD)
    redo = f"another --out, or delete {os.path.join(out, 'SegmentationClass')} and {path} to redraw the masks"
    if record["crowd"] != settings["crowd"]:
        raise ValueError(f"{path}: the masks in {out} were drawn with --crowd {record['crowd']}, this run asks for "
                         f"--crowd {settings['crowd']}; pass --crowd {record['crowd']}, {redo}")
    if record["categories"] != settings["categories"]:
        ours = {tuple(c) for c in settings["categories"]}
        diff = [c for c in record["categories"] if tuple(c) not in ours][:1] or \
               [c for c in settings["categories"] if tuple(c) not in {tuple(r) for r in record["categories"]}][:1]
        raise ValueError(f"annotation file {source}: its {len(settings['categories'])} categories differ from the "
                         f"{len(record['categories'])} the masks in {out} were drawn with (recorded in {path}; e.g. "
                         f"{diff[0] if diff else 'their order'}); train2014's and val2014's files must agree: use the "
                         f"files of one download, {redo}")


def read_record(out):
    path = os.path.join(out, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}): delete it and {os.path.join(out, 'SegmentationClass')}, "
                         "then rerun") from None
    if not isinstance(record, dict) or record.get("version") != VERSION or not {"crowd", "categories"} <= set(record):
        raise ValueError(f"{path} was written by another version of this tool: delete it and "
                         f"{os.path.join(out, 'SegmentationClass')}, then rerun")
    return record


def prepare_split(split, image_dir, ann_path, out, record, args):
    """Links, masks and lists of one split; returns (its counts, the record)."""
    data = read_instances(ann_path)
    settings = {"version": VERSION, "crowd": args.crowd, "categories": categories(data["categories"], ann_path)}
    if record is None:
        record = settings
        runtime.write_if_changed(os.path.join(out, RECORD), json.dumps(record, indent=1) + "\n")
    check_record(out, record, settings, ann_path)
    cat_value = {c: k + 1 for k, (c, _) in enumerate(settings["categories"])}
    images, anns = index(data, ann_path, cat_value)
    del data
    chosen = [i for i in images if anns[i] or not args.skip_unannotated]
    stems = {}
    for i in chosen:
        stem = os.path.splitext(os.path.basename(images[i]["file_name"]))[0]
        if stem in stems:
            raise ValueError(f"annotation file {ann_path}: images {stems[stem]} and {i} share the file name stem "
                             f"{stem}")
        stems[stem] = i
    folder = os.path.basename(image_dir)
    present = set(os.listdir(image_dir))
    missing = [images[i]["file_name"] for i in chosen if os.path.basename(images[i]["file_name"]) not in present]
    if missing:
        raise FileNotFoundError(f"image {os.path.join(image_dir, os.path.basename(missing[0]))} not found (nor "
                                f"{len(missing) - 1} more of the {len(chosen):,} images of {ann_path}): extract "
                                f"{DOWNLOAD.get(folder, 'the images')} into {os.path.dirname(image_dir)} again")
    jpeg_dir, mask_dir = os.path.join(out, "JPEGImages"), os.path.join(out, "SegmentationClass")
    for d in (jpeg_dir, mask_dir):
        runtime.make_dir(d, "--out")
    key = f"prepare_coco v{VERSION} crowd={args.crowd}"
    counts = {"images": len(images), "annotated": sum(1 for i in images if anns[i]), "listed": len(chosen),
              "masks_written": 0, "masks_kept": 0, "links_made": 0, "links_kept": 0, "links_replaced": 0,
              "polygons_dropped": 0}
    for stem in runtime.progress(sorted(stems), f"{split} masks", total=len(stems)):
        im = images[stems[stem]]
        counts["links_" + link(os.path.join(image_dir, os.path.basename(im["file_name"])),
                               os.path.join(jpeg_dir, f"{stem}.jpg"))] += 1
        mask_path = os.path.join(mask_dir, f"{stem}.png")
        if os.path.exists(mask_path):
            counts["masks_kept"] += 1
            continue
        mask, dropped = draw(anns[stems[stem]], im["height"], im["width"], cat_value, args.crowd, ann_path)
        counts["polygons_dropped"] += dropped
        datasets.save_mask(mask_path, mask, key=key)
        counts["masks_written"] += 1
    text = "".join(f"{s}\n" for s in sorted(stems))
    list_dir = os.path.join(out, "ImageSets", "Segmentation")
    runtime.make_dir(list_dir, "--out")
    counts["lists"] = {name: runtime.write_if_changed(os.path.join(list_dir, f"{name}.txt"), text)
                       for name in LISTS[split]}
    return counts, record


def report(split, folder, c):
    without = c["images"] - c["annotated"]
    print(f"{split} ({folder}): {c['images']:,} images, {c['annotated']:,} with annotations, {without:,} without"
          + (" (left out: --skip_unannotated)" if c["listed"] < c["images"] else
             " (all-background masks; the loaders leave them out of training)" if without else ""))
    print(f"  masks: {c['masks_written']:,} written, {c['masks_kept']:,} kept; links: {c['links_made']:,} made, "
          f"{c['links_kept']:,} kept"
          + (f", {c['links_replaced']:,} dangling ones replaced" if c["links_replaced"] else "")
          + (f"; dropped {c['polygons_dropped']:,} polygon(s) of < 3 points" if c["polygons_dropped"] else ""))
    print("  lists: " + ", ".join(f"{name}.txt {c['listed']:,} ids ({state})" for name, state in c["lists"].items()))


def main(args):
    """Both splits, one annotation file in memory at a time; returns {split: counts}."""
    found = inputs(args.coco_root)
    out = args.out
    results = {}
    with runtime.hold_folder(out, "--out"):
        record = read_record(out)
        if record is not None:  # a --crowd mismatch is refused before an annotation file is read
            check_record(out, record, {"crowd": args.crowd, "categories": record["categories"]}, None)
        for split, folder in SPLITS:
            results[split], record = prepare_split(split, *found[split], out, record, args)
            report(split, folder, results[split])
    print(f"{out}: {len(record['categories'])} classes (1..{len(record['categories'])}, 0 background"
          + (", 255 crowds" if args.crowd == "ignore" else "") + f"); --dataset coco --data {out}")
    return results


def cli(argv=None):
    """The command line (runtime.run_cli: bad input ends as one `prepare_coco.py: error: ...` line, exit status 1)."""
    return runtime.run_cli(main, build_parser(), argv=argv)


if __name__ == "__main__":
    cli()
