"""Reading data in VOC layout (VOC, COCO converted to it, the toy world): class lists, split lists, images,
masks and the image-level labels derived from them, the category-cluster files, and the two datasets the
stages iterate (ClsDataset for training S, ImageList for inference)."""
import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image, PngImagePlugin

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


def read_ids(root, split):
    """Image ids of `root/ImageSets/Segmentation/{split}.txt` (VOC lists may carry extra columns)."""
    check_root(root)
    path = _need(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), f"split list '{split}'")
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
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
    """RGB uint8 HxWx3; a clear error for a missing or unreadable file."""
    _need(path, "image")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
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


def derive_labels(root, ids):
    """{id: [class values present in its mask]}, the standard image-level labels, derived from the masks.

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
        mask_path = _need(os.path.join(folder, f"{i}.png"), "mask")
        st = os.stat(mask_path)
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


def load_labels(root, ids, num_classes, require_nonempty=True):
    """Multi-hot labels [N, K] for `ids`, derived from their masks (derive_labels). An image without any
    label cannot train a WSSS model."""
    table = derive_labels(root, ids)
    folder = mask_dir(root)
    y = np.zeros((len(ids), num_classes), np.float32)
    for n, i in enumerate(ids):
        values, where = table[i], os.path.join(folder, f"{i}.png")
        if require_nonempty and not values:
            raise ValueError(f"image {i} has an empty label row: its mask {where} holds no class, and every "
                             "training image needs at least one; remove it from the split list")
        if values and (min(values) < 1 or max(values) > num_classes):
            raise ValueError(f"mask {where} holds class {max(values)} outside 1..{num_classes}: class count "
                             "mismatch between the masks and the class list")
        y[n, np.asarray(values, int) - 1] = 1
    return y


class ClsDataset(torch.utils.data.Dataset):
    """(image, multi-hot label) pairs at a fixed square size, the input of S in every stage.

    Images come out as float [3, size, size] in [0, 1]: S normalises them itself, and the masked CLIP
    samples are built from the raw pixels. Augmentation (horizontal flip) draws from an RNG seeded by
    (seed, epoch, index), so a resumed run sees exactly the images an uninterrupted run would.
    Images whose mask holds no class (scenery alone) are left out: no (image, class) pair of stages (a)-(c)
    comes from them. `self.left_out` counts them, for the stage's log."""

    def __init__(self, root, split, num_classes, size, augment=False, seed=0):
        self.root, self.size, self.augment, self.seed, self.epoch = root, size, augment, seed, 0
        ids = read_ids(root, split)
        labels = load_labels(root, ids, num_classes, require_nonempty=False)
        keep = labels.any(1)
        if not keep.any():
            raise ValueError(f"no image of split list '{split}' in {root} has a class in its mask "
                             f"({mask_dir(root)}): there is nothing to learn classes from")
        self.ids, self.labels = [i for i, k in zip(ids, keep) if k], labels[keep]
        self.left_out = len(ids) - len(self.ids)

    def note(self, split):
        """The log line about left-out images, or None."""
        return (f"{self.left_out} of {self.left_out + len(self.ids)} images of '{split}' hold no class in their "
                "mask and are left out" if self.left_out else None)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, n):
        img = Image.fromarray(read_image(image_path(self.root, self.ids[n])))
        img = img.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        if self.flipped(n):
            x = x.flip(-1)
        return x, torch.from_numpy(self.labels[n]), n

    def flipped(self, n):
        """Whether sample n comes out flipped in the current epoch."""
        return self.augment and np.random.default_rng([self.seed, self.epoch, n]).random() < 0.5


class ImageList(torch.utils.data.Dataset):
    """Images as they are on disk (uint8 HxWx3 tensors, any size) with their list index, for inference."""

    def __init__(self, root, ids):
        self.root, self.ids = root, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, n):
        return torch.from_numpy(read_image(image_path(self.root, self.ids[n])).copy()), n

