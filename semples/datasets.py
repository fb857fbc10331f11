"""Reading data in VOC layout (VOC, COCO converted to it, the toy world): class lists, split lists, images,
masks, the image-level labels, the category-cluster files, and the two datasets the stages iterate
(ClsDataset for training S, ImageList for inference).

Image-level labels come from the masks (the class values present in SegmentationClass(Aug)/{id}.png), or
from a labels file in the dataset folder, found by its fixed name:

    DATA/labels.json       {"image id": ["class name", ...], ...}; names as in read_class_names (VOC's
                           folder names such as "diningtable", or CLIP_NAMES' spelling "dining table");
                           [] = an image with no class (as a mask holding only background)
    DATA/cls_labels.npy    the file of the IRN/PSA family: np.save of a dict {id: multi-hot array over the K
                           foreground classes (no background column), 0/1, float or int}; keys are the VOC id
                           "2007_000032" or IRN's int form 2007000032. Read with allow_pickle: it is the
                           user's own file, as in IRN.

Both present is refused. An image takes its labels from the file when the file has an entry for it, else
from its mask; an image with both must agree. Masks are then needed only for the splits that are scored
(train for the seeds and pseudo masks, val for the segmenter). Split lists (read_ids) may be VOC lists
(extra columns ignored) or DeepLab-style lists ("/JPEGImages/x.jpg /SegmentationClassAug/x.png")."""
import hashlib
import json
import os
import re

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from semples.runtime import atomic_path

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush"]
# CLIP reads better with natural words than with VOC's folder names.
CLIP_NAMES = {"aeroplane": "aeroplane", "diningtable": "dining table", "motorbike": "motorbike",
              "pottedplant": "potted plant", "tvmonitor": "tv monitor"}



# ----------------------------------------------------------------------------------------------
# The VOC-layout reader
# ----------------------------------------------------------------------------------------------
def _need(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}. Check --data (it must point at a folder "
                                "with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/, see README "
                                "'Data'), or run `python tools/make_toy.py` for the toy world.")
    return path


def check_root(root):
    """The --data folder must exist before anything in it is looked for."""
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"--data folder {root} does not exist: point --data at the dataset root (VOC "
                                "layout, see README 'Data'), or run `python tools/make_toy.py` for the toy world")
    return root


IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _list_id(root, line):
    """The image id a (stripped, non-empty) line of a split list names."""
    if any(c.isspace() for c in line) and any(
            os.path.exists(os.path.join(root, "JPEGImages", line + e)) for e in (".jpg", ".png")):
        return line  # an id with a space in it, kept whole
    first = line.split()[0]
    if "/" in first or "\\" in first or first.lower().endswith(IMAGE_EXTS):
        # DeepLab-style: "/JPEGImages/x.jpg /SegmentationClassAug/x.png" or the image path alone; the image
        # path runs to its extension (a file name may hold a space)
        m = re.match(r"(.+?\.(?:jpe?g|png))(?:\s|$)", line, re.IGNORECASE)
        path = (m.group(1) if m else first).replace("\\", "/")
        return os.path.splitext(path.rsplit("/", 1)[-1])[0]
    return first  # a VOC list; extra columns ("2008_000001 -1") are ignored


def read_ids(root, split):
    """Image ids of `root/ImageSets/Segmentation/{split}.txt`, one a line. A line is read as
    - a VOC id, extra columns ignored ("2008_000001 -1" -> "2008_000001");
    - a DeepLab-style line, "/JPEGImages/x.jpg /SegmentationClassAug/x.png" (also without the leading slash,
      or the image path alone) -> "x";
    - an id with a space in it, kept whole, where the whole line names an existing JPEGImages/{line}.jpg/.png.
    Windows line endings, a UTF-8 BOM, blank lines and trailing blanks are ignored. A duplicated id and an
    empty list are refused."""
    check_root(root)
    path = _need(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), f"split list '{split}'")
    ids, line_of = [], {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")  # universal newlines: \r\n and \r are \n here
    except UnicodeDecodeError as e:
        raise ValueError(f"split list {path} is not UTF-8 text ({e}); save it as plain text, one image id a "
                         "line") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        i = _list_id(root, line)
        if i in line_of:
            raise ValueError(f"split list {path} names image '{i}' twice, on line {line_of[i]} and line {number}; "
                             "remove one (a listed image is used once)")
        line_of[i] = number
        ids.append(i)
    if not ids:
        raise ValueError(f"split list {path} is empty")
    return ids


def read_class_names(root, dataset="toy"):
    """Foreground class names: `root/class_names.txt` if present (toy), else the VOC/COCO list. A first line
    naming the background ("background", "_background_", as labelme's and other VOC-style lists begin) is
    skipped: mask index 0 is the background either way, and counting it as a class would shift every other."""
    path = os.path.join(check_root(root), "class_names.txt")
    if os.path.exists(path):
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if names and names[0].strip("_").lower() == "background":
            names = names[1:]
        if not names:
            raise ValueError(f"{path} names no class: write one foreground class name a line")
        seen = {}
        for n, name in enumerate(names):  # one text per class: a repeat would match two classes with one text
            key = name.lower()
            if key in seen:
                raise ValueError(f"{path} names the class '{name}' twice (classes {seen[key] + 1} and {n + 1}); "
                                 "each line must name another class, in the order of the mask values 1, 2, ...")
            seen[key] = n
        return names
    if dataset in ("voc", "coco"):
        return list(VOC_CLASSES if dataset == "voc" else COCO_CLASSES)
    raise FileNotFoundError(f"{path} not found and dataset '{dataset}' has no built-in class list")


def read_clusters(path, class_names, flag="--clusters"):
    """A category-cluster file (semples/clusters/*.json: {"cluster name": [class, ...]}) checked against the
    dataset's classes: every class in exactly one cluster. Returns {cluster name: [class, ...]} in file order."""
    try:
        with open(path) as f:
            clusters = json.load(f)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"{flag} {path} is not valid JSON ({e})") from None
    if not (isinstance(clusters, dict) and clusters and all(
            isinstance(v, list) and v and all(isinstance(c, str) for c in v) for v in clusters.values())):
        raise ValueError(f'{flag} {path} must be a JSON object {{"cluster name": ["class", ...], ...}} with '
                         "non-empty lists of class names")
    seen = {}
    for name, members in clusters.items():
        for c in members:
            if c not in class_names:
                raise ValueError(f"{flag} {path}: cluster '{name}' names '{c}', which is not a class of the "
                                 f"dataset ({', '.join(class_names[:6])}...)")
            if c in seen:
                raise ValueError(f"{flag} {path}: class '{c}' is in two clusters, '{seen[c]}' and '{name}'; "
                                 "put every class in exactly one")
            seen[c] = name
    missing = [c for c in class_names if c not in seen]
    if missing:
        raise ValueError(f"{flag} {path}: class(es) {', '.join(missing)} in no cluster; put every class in "
                         "exactly one (a cluster may hold a single class)")
    return clusters


def mask_dir(root):
    """VOC keeps the 10,582 train_aug masks (SBD) in SegmentationClassAug; VOC's own and the toy's are
    in SegmentationClass."""
    aug = os.path.join(root, "SegmentationClassAug")
    return aug if os.path.isdir(aug) else os.path.join(root, "SegmentationClass")


def image_path(root, image_id):
    """JPEGImages/{id}.jpg as in VOC; a generated folder may hold {id}.png instead."""
    path = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
    png = path[:-4] + ".png"
    return png if not os.path.exists(path) and os.path.exists(png) else path


def read_image(path):
    """RGB uint8 HxWx3 as an image viewer shows it: a photo's EXIF orientation applied (a phone's portrait shot
    is stored sideways; its mask was drawn on the upright view); a clear error for a missing or unreadable file."""
    _need(path, "image")
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except OSError as e:
        raise ValueError(f"cannot read image {path} ({e}); replace or remove it from the split list") from e


def read_mask(path):
    """Class-index map (uint8 HxW) from a palette, grey or 16-bit grey PNG (as OpenCV writes a uint16 array).
    RGB-coloured masks are refused, because turning colours back into indices silently is how label bugs
    start."""
    _need(path, "mask")
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L"):
                return np.asarray(im)
            if im.mode.startswith("I"):
                m = np.asarray(im)
                if m.size and (m.min() < 0 or m.max() > 255):
                    raise ValueError(f"mask {path} holds values {m.min()}..{m.max()}; class indices must lie in "
                                     "0..255 (0 background, 255 ignored)")
                return m.astype(np.uint8)
            raise ValueError(f"mask {path} has mode {im.mode}; expected a palette (P), grey (L) or 16-bit grey "
                             "PNG holding class indices")
    except OSError as e:
        raise ValueError(f"cannot read mask {path} ({e})") from e


def voc_palette():
    """The standard VOC colour map (256 entries, bit-interleaved), flattened for PIL."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal.reshape(-1).tolist()


_PALETTE = voc_palette()


def save_mask(path, mask, key=None):
    """Write a class-index map as a VOC-palette PNG (visible in any viewer), atomically. `key` (a string
    naming what made the mask) goes into the PNG's text; mask_key reads it back."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    im.putpalette(_PALETTE)  # turns the grey image into a palette one, indices unchanged
    info = None
    if key is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(MASK_KEY, key)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)


MASK_KEY = "semples_key"


def mask_key(path):
    """The key save_mask stored in a PNG; None if the file is absent, unreadable or has none."""
    try:
        with Image.open(path) as im:
            return im.text.get(MASK_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def labels_of_mask(mask, num_classes=None, where=""):
    """Image-level labels the standard way: the class values present in the mask, 0 and 255 ignored."""
    values = np.unique(mask)
    values = [int(v) for v in values if v not in (0, 255)]
    if num_classes is not None and values and max(values) > num_classes:
        raise ValueError(f"mask {where} holds class {max(values)} but the dataset has {num_classes} classes")
    return values


def cache_dir():
    """Where derived data is cached: $SEMPLES_CACHE, else ~/.cache/semples. Never inside a dataset."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("SEMPLES_CACHE") or os.path.join(home, "semples")


def derive_labels(root, ids, missing_ok=False):
    """{id: [class values present in its mask]}, the standard image-level labels, derived from the masks.
    `missing_ok`: an id without a mask is left out of the result (else FileNotFoundError).

    Nothing is written into the dataset. The labels are cached in cache_dir(), one file per mask folder,
    each entry keyed by its mask file's size, mtime and inode: a changed mask is read again. Reading
    costs ~0.15 ms per toy mask and ~1-3 ms per VOC/COCO mask (15-30 s for VOC's 10,582, minutes for
    COCO's 82k at every stage start), hence the cache; an unwritable cache only costs that time."""
    folder = os.path.abspath(mask_dir(check_root(root)))
    path = os.path.join(cache_dir(), "labels-" + hashlib.sha256(folder.encode()).hexdigest()[:16] + ".json")
    try:
        with open(path) as f:
            cache = json.load(f)["labels"]
    except (OSError, ValueError, KeyError, TypeError):
        cache = {}
    labels, changed = {}, False
    for i in ids:
        mask_path = os.path.join(folder, f"{i}.png")
        if missing_ok and not os.path.exists(mask_path):
            continue
        st = os.stat(_need(mask_path, "mask"))
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = cache.get(i)
        if isinstance(hit, list) and len(hit) == 2 and hit[0] == stamp:
            labels[i] = hit[1]
        else:
            labels[i] = labels_of_mask(read_mask(mask_path), where=mask_path)
            cache[i], changed = [stamp, labels[i]], True
    if changed:
        try:
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                json.dump({"mask_dir": folder, "labels": cache}, f)
        except OSError:
            pass
    return labels


# ----------------------------------------------------------------------------------------------
# Image-level labels without masks: DATA/labels.json or DATA/cls_labels.npy
# ----------------------------------------------------------------------------------------------
LABEL_FILES = ("labels.json", "cls_labels.npy")


def labels_file(root):
    """The dataset's labels file (LABEL_FILES, see the module docstring), or None; both present is refused."""
    found = [os.path.join(root, name) for name in LABEL_FILES if os.path.exists(os.path.join(root, name))]
    if len(found) > 1:
        raise ValueError(f"two labels files in {root}: {found[0]} and {found[1]}; keep one of them (they would "
                         "have to say the same)")
    return found[0] if found else None


def _irn_int_id(image_id):
    """IRN's cls_labels.npy keys VOC ids as ints: "2007_000032" -> "2007000032" (as a string); else None."""
    return image_id[:4] + image_id[5:] if re.fullmatch(r"\d{4}_\d+", image_id) else None


def _label_class_names(root, num_classes, class_names):
    """The class names labels.json is read against: those given, else read_class_names (class_names.txt,
    else the VOC or COCO list by the class count)."""
    if class_names is not None:
        return list(class_names)
    if os.path.exists(os.path.join(root, "class_names.txt")):
        names = read_class_names(root)
    else:
        names = {len(VOC_CLASSES): VOC_CLASSES, len(COCO_CLASSES): COCO_CLASSES}.get(num_classes)
    if names is None or len(names) != num_classes:
        raise ValueError(f"{os.path.join(root, 'labels.json')} names classes, but {root} has no class list of "
                         f"{num_classes} classes to read them against: add {os.path.join(root, 'class_names.txt')}")
    return list(names)


def _read_labels_json(path, num_classes, class_names):
    """labels.json -> {id: sorted 1-based class values}."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            table = json.load(f)
    except OSError as e:
        raise ValueError(f"labels file {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"labels file {path} is not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise ValueError(f'labels file {path} must be a JSON object {{"image id": ["class name", ...], ...}}')
    index = {n: k + 1 for k, n in enumerate(class_names)}
    for k, n in enumerate(class_names):  # CLIP's natural spelling ("dining table") names VOC's "diningtable" too
        index.setdefault(CLIP_NAMES.get(n, n), k + 1)
    out = {}
    for i, names in table.items():
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"labels file {path}: the entry of image '{i}' must be a list of class names "
                             f'(["{class_names[0]}", ...]; [] for an image with no class), got {names!r}')
        for n in names:
            if n not in index:
                raise ValueError(f"labels file {path}: image '{i}' names class '{n}', which is not a class of the "
                                 f"dataset (known: {', '.join(class_names[:6])}"
                                 f"{', ...' if len(class_names) > 6 else ''})")
        out[i] = sorted({index[n] for n in names})
    return out


def _read_labels_npy(path, num_classes):
    """cls_labels.npy (IRN/PSA) -> {id: sorted 1-based class values}; int keys become their string form."""
    try:
        obj = np.load(path, allow_pickle=True)
        table = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"labels file {path}: cannot read it as a NumPy file ({e})") from None
    if not isinstance(table, dict):
        raise ValueError(f"labels file {path} must hold a dict {{image id: multi-hot array of {num_classes}}}, as "
                         "np.save(path, dict) writes it (IRN's cls_labels.npy)")
    out = {}
    for key, row in table.items():
        i = str(int(key)) if isinstance(key, (int, np.integer)) else str(key)
        try:
            row = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"labels file {path}: the row of image {i} is not a numeric array") from None
        if row.shape != (num_classes,):
            extra = (f" (a background column first? the row holds the {num_classes} foreground classes only)"
                     if row.shape == (num_classes + 1,) else "")
            raise ValueError(f"labels file {path}: the row of image {i} has shape {tuple(row.shape)}, expected "
                             f"({num_classes},), one 0/1 entry per class of the dataset{extra}")
        if not np.isin(row, (0, 1)).all():
            raise ValueError(f"labels file {path}: the row of image {i} holds {sorted(set(row.tolist()) - {0, 1})}; "
                             "a multi-hot row holds 0 or 1 only")
        out[i] = (np.flatnonzero(row) + 1).tolist()
    return out


def read_labels_file(root, num_classes, class_names=None):
    """(path, {id: sorted 1-based class values}) of the dataset's labels file, or (None, {})."""
    path = labels_file(check_root(root))
    if path is None:
        return None, {}
    if path.endswith(".npy"):
        return path, _read_labels_npy(path, num_classes)
    return path, _read_labels_json(path, num_classes, _label_class_names(root, num_classes, class_names))


def load_labels(root, ids, num_classes, require_nonempty=True, class_names=None):
    """Multi-hot labels [N, K] (float32) for `ids`.

    Each image's labels come from the dataset's labels file when it has an entry for the image (DATA/labels.json:
    {"image id": ["class name", ...]}, or DATA/cls_labels.npy: {id or IRN's int id: multi-hot [K]}; see the
    module docstring), else from its mask (derive_labels: the class values present in
    SegmentationClass(Aug)/{id}.png). Refused: an image with neither; an image whose file entry and mask
    disagree; a class name the dataset does not have; a multi-hot row not of length K; both files present.
    labels.json is read against `class_names` (default: read_class_names; the VOC/COCO list by K).
    `require_nonempty`: an image without any label (an empty entry, a mask of background alone) is refused,
    since it cannot train a WSSS model; else its row is all zeros."""
    file_path, from_file = read_labels_file(root, num_classes, class_names)
    folder = mask_dir(root)

    def in_file(i):
        if i in from_file:
            return from_file[i]
        alt = _irn_int_id(i)
        return from_file.get(alt) if alt is not None else None

    filed = {i: in_file(i) for i in ids}
    table = derive_labels(root, ids, missing_ok=True)
    names = None

    def spelled(values):
        nonlocal names
        if names is None:
            try:
                names = _label_class_names(root, num_classes, class_names)
            except ValueError:
                names = [str(k + 1) for k in range(num_classes)]
        return "[" + ", ".join(names[v - 1] if 1 <= v <= len(names) else str(v) for v in values) + "]"

    y = np.zeros((len(ids), num_classes), np.float32)
    for n, i in enumerate(ids):
        where = os.path.join(folder, f"{i}.png")
        values, mask_values = filed[i], table.get(i)
        if values is None and mask_values is None:
            told = (f"the labels file {file_path} has no entry for it" if file_path else
                    f"there is no labels file ({os.path.join(root, LABEL_FILES[0])} or {LABEL_FILES[1]})")
            raise FileNotFoundError(f"image {i} has no label: {told} and its mask {where} does not exist; add its "
                                    "mask or its labels, or remove it from the split list (and check --data, see "
                                    "README 'Data')")
        if mask_values and (min(mask_values) < 1 or max(mask_values) > num_classes):
            raise ValueError(f"mask {where} holds class {max(mask_values)} outside 1..{num_classes}: class count "
                             "mismatch between the masks and the class list")
        if values is not None and mask_values is not None and sorted(mask_values) != values:
            raise ValueError(f"image {i}: the labels file {file_path} says {spelled(values)} but its mask {where} "
                             f"holds {spelled(sorted(mask_values))}; correct one of them (or delete the mask to "
                             "take the file's labels)")
        if values is None:
            values, source = mask_values, f"its mask {where}"
        else:
            source = f"its entry in {file_path}"
        if require_nonempty and not values:
            raise ValueError(f"image {i} has an empty label row: {source} holds no class, and every "
                             "training image needs at least one; remove it from the split list")
        y[n, np.asarray(values, int) - 1] = 1
    return y


def file_stamp(path):
    """[size, modification time in ns] of a file: what tells a replaced image (or mask) from the one a run read."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def data_key(root, ids, labels=None, masks=None):
    """A short hash of what a run reads: the image list in order, each image file's size and modification time,
    the labels and, with `masks` (a folder), each training mask's size and time. Part of a run's resume and
    reuse keys: after an image is replaced, a mask relabelled or the list edited, a rerun starts afresh instead of
    resuming training on other data."""
    h = hashlib.sha256()
    for i in ids:
        files = [image_path(root, i)] + ([os.path.join(masks, f"{i}.png")] if masks else [])
        h.update((i + "".join(f"\0{size}\0{time}" for size, time in map(file_stamp, files)) + "\n").encode())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


class ClsDataset(torch.utils.data.Dataset):
    """(image, multi-hot label) pairs at a fixed square size, the input of S in every stage.

    Images come out as float [3, size, size] in [0, 1]: S normalises them itself, and the masked CLIP
    samples are built from the raw pixels. `augment`: False/'none'; True/'flip' (the image resized to the
    square, flipped half the time); 'deit' (WeakTr's CAM training, DeiT's recipe with torchvision's pieces:
    RandomResizedCrop scale 0.08-1 bicubic, flip, RandAugment 2 ops at magnitude 9, RandomErasing p 0.25 with
    random values; timm's rand-m9-mstd0.5-inc1 jitters the magnitude and its erasing fills normalised noise).
    Every draw comes from an RNG seeded by (seed, epoch, index), so a resumed run sees exactly the images an
    uninterrupted run would, whichever process or worker loads them.
    Labels: load_labels (the labels file where it has the image, else the mask).
    Images whose labels hold no class (scenery alone) are left out: no (image, class) pair of stages (a)-(c)
    comes from them. `self.left_out` counts them, for the stage's log."""

    AUGMENTS = {False: "none", True: "flip", "none": "none", "flip": "flip", "deit": "deit"}

    def __init__(self, root, split, num_classes, size, augment=False, seed=0):
        if augment not in self.AUGMENTS:
            raise ValueError(f"--augment must be one of none, flip, deit; got {augment!r}")
        self.root, self.size, self.augment, self.seed, self.epoch = root, size, self.AUGMENTS[augment], seed, 0
        self.deit = None
        if self.augment == "deit":
            from torchvision import transforms as T
            self.deit = T.Compose([
                T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(), T.RandAugment(num_ops=2, magnitude=9), T.PILToTensor(),
                T.ConvertImageDtype(torch.float32), T.RandomErasing(p=0.25, value="random")])
        ids = read_ids(root, split)
        labels = load_labels(root, ids, num_classes, require_nonempty=False)
        self.labels_file = labels_file(root)
        where = f"their mask or {self.labels_file}" if self.labels_file else "their mask"
        keep = labels.any(1)
        if not keep.any():
            raise ValueError(f"no image of split list '{split}' in {root} has a class in {where} "
                             f"({mask_dir(root)}): there is nothing to learn classes from")
        self.ids, self.labels = [i for i, k in zip(ids, keep) if k], labels[keep]
        self.left_out = len(ids) - len(self.ids)
        self.key = data_key(root, self.ids, self.labels)  # what this data set is, for resume and reuse keys
        self._where = where

    def note(self, split):
        """The log line about left-out images, or None."""
        return (f"{self.left_out} of {self.left_out + len(self.ids)} images of '{split}' hold no class in "
                f"{self._where} and are left out" if self.left_out else None)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, n):
        img = Image.fromarray(read_image(image_path(self.root, self.ids[n])))
        if self.deit is not None:
            with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global RNG
                torch.manual_seed(int(np.random.default_rng([self.seed, self.epoch, n]).integers(2 ** 62)))
                x = self.deit(img).clamp_(0, 1)  # RandomErasing's normal noise leaves [0, 1]
            return x, torch.from_numpy(self.labels[n]), n
        img = img.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        if self.flipped(n):
            x = x.flip(-1)
        return x, torch.from_numpy(self.labels[n]), n

    def flipped(self, n):
        """Whether sample n comes out flipped in the current epoch."""
        return self.augment == "flip" and np.random.default_rng([self.seed, self.epoch, n]).random() < 0.5


class ImageList(torch.utils.data.Dataset):
    """Images as they are on disk (uint8 HxWx3 tensors, any size) with their list index, for inference."""

    def __init__(self, root, ids):
        self.root, self.ids = root, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, n):
        return torch.from_numpy(read_image(image_path(self.root, self.ids[n])).copy()), n

