"""PASCAL VOC 2012 + SBD as the stages read them: SegmentationClassAug/ (the train_aug masks) and train_aug.txt.

    python tools/prepare_voc.py --voc data/VOCdevkit/VOC2012 --sbd data/benchmark_RELEASE/dataset

Reads VOC (VOCtrainval_11-May-2012 extracted: VOC/JPEGImages/, VOC/SegmentationClass/ palette PNGs,
VOC/ImageSets/Segmentation/{train,val}.txt) and SBD (benchmark.tgz extracted: SBD/cls/{id}.mat, whose MATLAB
struct GTcls holds the HxW class-index map in GTcls.Segmentation, 0 background, 1..20 classes; SBD/train.txt,
SBD/val.txt). Writes into the VOC folder:

- VOC/SegmentationClassAug/{id}.png, class-index PNGs in the VOC palette, one per id of SBD's train + val and
  VOC's train + val: VOC's own SegmentationClass mask where VOC has one (it carries the 255 boundary band; the
  usual SegmentationClassAug does the same), SBD's mask otherwise. Real data: 12,031 masks, 2,913 from VOC and
  9,118 from SBD.
- VOC/ImageSets/Segmentation/train_aug.txt = (SBD train + SBD val + VOC train) minus VOC val, sorted, each id
  once. Real data: 10,582 ids (VOC train 1,464, val 1,449).

It checks that train_aug and val are disjoint, that every id has a JPEG of its mask's size and every train_aug id
a mask, and that mask values lie in 0..20 or 255; counts other than the real dataset's get a warning (a subset is
fine). Files are written atomically and a rerun writes nothing (a mask already there with the same content is
kept: "0 written, N kept").

An already downloaded SegmentationClassAug is checked instead of built (every train_aug id present, values in
0..20 or 255, the JPEG's size); only a missing train_aug.txt is written, as the folder's ids minus VOC val:

    python tools/prepare_voc.py --voc data/VOCdevkit/VOC2012                 # VOC/SegmentationClassAug exists
    python tools/prepare_voc.py --voc data/VOCdevkit/VOC2012 --aug DIR       # a SegmentationClassAug elsewhere
"""
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
from semples import datasets, runtime

NUM_CLASSES = len(datasets.VOC_CLASSES)  # 20
# The real dataset's counts: anything else is warned about (a subset is fine).
REAL_COUNTS = {"train_aug": 10582, "train": 1464, "val": 1449}


def build_parser():
    p = runtime.new_parser(__doc__)
    p.add_argument("--voc", type=str, default=os.path.join(runtime.REPO, "data", "VOCdevkit", "VOC2012"),
                   help="the extracted VOCdevkit/VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/); "
                        "SegmentationClassAug/ and train_aug.txt are written into it")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sbd", type=str, default=None,
                      help="SBD's extracted benchmark_RELEASE/dataset folder (cls/*.mat, train.txt, val.txt): "
                           "build VOC/SegmentationClassAug from it")
    mode.add_argument("--aug", type=str, default=None,
                      help="an already downloaded SegmentationClassAug folder to check instead of building one "
                           "(without --sbd and --aug: VOC/SegmentationClassAug if it exists)")
    return p


# ----------------------------------------------------------------------------------------------
# Reading the inputs
# ----------------------------------------------------------------------------------------------

def check_voc(voc):
    """The VOC folder, with a hint when it names VOCdevkit or the tar's top folder instead of VOC2012."""
    hint = "pass --voc the extracted VOCdevkit/VOC2012 folder (from VOCtrainval_11-May-2012.tar)"
    for inner in ("VOC2012", os.path.join("VOCdevkit", "VOC2012")):
        if not os.path.isdir(os.path.join(voc, "JPEGImages")) and os.path.isdir(os.path.join(voc, inner, "JPEGImages")):
            hint = f"it holds {inner}/: pass --voc {os.path.join(voc, inner)}"
    runtime.need_dir(voc, "--voc folder", hint)
    runtime.need_dir(os.path.join(voc, "JPEGImages"), "--voc: JPEG folder", hint)
    runtime.need_dir(os.path.join(voc, "ImageSets", "Segmentation"), "--voc: list folder", hint)
    return voc


def check_sbd(sbd):
    hint = "pass --sbd the extracted benchmark_RELEASE/dataset folder (from SBD's benchmark.tgz)"
    if not os.path.isdir(os.path.join(sbd, "cls")) and os.path.isdir(os.path.join(sbd, "dataset", "cls")):
        hint = f"it holds dataset/: pass --sbd {os.path.join(sbd, 'dataset')}"
    runtime.need_dir(sbd, "--sbd folder", hint)
    runtime.need_dir(os.path.join(sbd, "cls"), "--sbd: mask folder", hint)
    return sbd


def read_list(path, hint):
    """Ids of a list file, first column (VOC lists may carry more), in file order."""
    runtime.need_file(path, "list", hint)
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise ValueError(f"list {path} is empty: {hint}")
    return ids


def voc_list(voc, split):
    return os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt")


def read_sbd_mask(path):
    """GTcls.Segmentation of an SBD cls/{id}.mat: the HxW class-index map."""
    import scipy.io

    hint = "re-extract SBD's benchmark.tgz (cls/ holds one GTcls struct per image)"
    runtime.need_file(path, "SBD mask", hint)
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... for a broken file
        raise ValueError(f"cannot read SBD mask {path} ({type(e).__name__}: {e}): {hint}") from None
    gt, seg = mat.get("GTcls"), None
    if isinstance(gt, np.ndarray) and gt.dtype.names and "Segmentation" in gt.dtype.names and gt.size == 1:
        seg = gt.reshape(-1)[0]["Segmentation"]
    if not (isinstance(seg, np.ndarray) and seg.ndim == 2 and seg.size and seg.dtype.kind in "uif"):
        found = ("no GTcls" if gt is None else "GTcls without a Segmentation field" if seg is None
                 else f"GTcls.Segmentation of shape {getattr(seg, 'shape', '?')}, dtype {getattr(seg, 'dtype', '?')}")
        raise ValueError(f"SBD mask {path} holds {found}, not an HxW class-index map in GTcls.Segmentation: is it "
                         f"from SBD's cls/ folder (not inst/)? {hint}")
    if seg.dtype.kind == "f" and not np.array_equal(seg, np.round(seg)):
        raise ValueError(f"SBD mask {path}: GTcls.Segmentation holds non-integer values: {hint}")
    return seg


def check_values(mask, path, hint):
    """Class indices 0..20, or 255 (VOC's boundary band, ignored)."""
    values = np.unique(mask)
    bad = [int(v) for v in values if not (0 <= v <= NUM_CLASSES or v == 255)]
    if bad:
        raise ValueError(f"mask {path} holds value(s) {', '.join(map(str, bad[:5]))}; VOC masks hold 0..{NUM_CLASSES} "
                         f"(0 background) or 255 (ignored): {hint}")
    return mask.astype(np.uint8)


def jpeg_size(voc, image_id, where):
    """(H, W) of the id's JPEG; `where` names the list(s) the id comes from."""
    path = datasets.image_path(voc, image_id)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JPEG {path} not found, but id {image_id} is in {where}: every listed id needs its "
                                "image in VOC/JPEGImages; re-extract VOCtrainval_11-May-2012.tar, or remove the id "
                                "from the list")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except OSError as e:
        raise ValueError(f"cannot read image {path} ({e}): replace it (re-extract VOC)") from None
    return h, w


def check_size(mask, mask_path, hw, voc, image_id, hint):
    if mask.shape != hw:
        raise ValueError(f"mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
                         f"{datasets.image_path(voc, image_id)} is {hw[0]}x{hw[1]}: {hint}")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def same_mask(path, mask):
    """Whether `path` already holds exactly this class-index map."""
    if not os.path.exists(path):
        return False
    try:
        old = datasets.read_mask(path)
    except ValueError:  # unreadable or RGB: replaced
        return False
    return old.shape == mask.shape and np.array_equal(old, mask)


def write_list(path, ids):
    """Write the list unless it already holds exactly these ids; returns 'written', 'replaced' or 'kept'."""
    return runtime.write_if_changed(path, "".join(f"{i}\n" for i in ids))


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def warn_counts(counts):
    for name, n in counts.items():
        if n != REAL_COUNTS[name]:
            warn(f"{name} has {n:,} ids; the full VOC 2012 + SBD has {REAL_COUNTS[name]:,} (fine for a subset)")


def check_lists(train_aug, val, list_path, val_path):
    both = sorted(set(train_aug) & set(val))
    if both:
        raise ValueError(f"{list_path} holds {len(both)} id(s) of {val_path} (e.g. {', '.join(both[:3])}): train_aug "
                         "must not hold the val images the segmenter is scored on; remove them (or delete the list "
                         "and rerun to have it made)")


# ----------------------------------------------------------------------------------------------
# The two modes
# ----------------------------------------------------------------------------------------------
def build(args):
    """SegmentationClassAug and train_aug.txt from VOC and SBD."""
    voc, sbd = check_voc(args.voc), check_sbd(args.sbd)
    voc_hint = "re-extract VOCtrainval_11-May-2012.tar into --voc"
    sbd_hint = "re-extract SBD's benchmark.tgz; --sbd is its benchmark_RELEASE/dataset folder"
    runtime.need_dir(os.path.join(voc, "SegmentationClass"), "--voc: mask folder", voc_hint)
    lists = {"VOC train": voc_list(voc, "train"), "VOC val": voc_list(voc, "val"),
             "SBD train": os.path.join(sbd, "train.txt"), "SBD val": os.path.join(sbd, "val.txt")}
    ids = {name: read_list(path, sbd_hint if name.startswith("SBD") else voc_hint) for name, path in lists.items()}
    sbd_ids, voc_ids = set(ids["SBD train"]) | set(ids["SBD val"]), set(ids["VOC train"]) | set(ids["VOC val"])
    train_aug = sorted((sbd_ids | set(ids["VOC train"])) - set(ids["VOC val"]))
    if not train_aug:
        raise ValueError(f"train_aug is empty: every id of SBD's and VOC's train lists is in {lists['VOC val']}")

    out = os.path.join(voc, "SegmentationClassAug")
    runtime.make_dir(out, "--voc")
    counts = {"voc": 0, "sbd": 0, "written": 0, "kept": 0, "replaced": 0}
    all_ids, id_sets = sorted(sbd_ids | voc_ids), {name: set(v) for name, v in ids.items()}
    for i in runtime.progress(all_ids, "masks"):
        where = " and ".join(lists[n] for n in lists if i in id_sets[n])
        hw = jpeg_size(voc, i, where)
        voc_mask = os.path.join(voc, "SegmentationClass", f"{i}.png")
        if os.path.exists(voc_mask):
            src, mask, hint = voc_mask, datasets.read_mask(voc_mask), voc_hint
            counts["voc"] += 1
        elif i in voc_ids:
            raise FileNotFoundError(f"VOC mask {voc_mask} not found, but id {i} is in {where}: {voc_hint}")
        else:
            src, hint = os.path.join(sbd, "cls", f"{i}.mat"), sbd_hint
            mask = read_sbd_mask(src)
            counts["sbd"] += 1
        mask = check_values(mask, src, hint)
        check_size(mask, src, hw, voc, i, hint)
        path = os.path.join(out, f"{i}.png")
        if same_mask(path, mask):
            counts["kept"] += 1
            continue
        counts["replaced" if os.path.exists(path) else "written"] += 1
        datasets.save_mask(path, mask)

    missing = [i for i in train_aug if not os.path.exists(os.path.join(out, f"{i}.png"))]
    if missing:  # cannot happen unless the folder changed under us
        raise FileNotFoundError(f"{os.path.join(out, missing[0] + '.png')} (and {len(missing) - 1} more) missing "
                                "after writing: rerun")
    list_path = voc_list(voc, "train_aug")
    check_lists(train_aug, ids["VOC val"], list_path, lists["VOC val"])
    list_state = write_list(list_path, train_aug)
    warn_counts({"train_aug": len(train_aug), "train": len(set(ids["VOC train"])), "val": len(set(ids["VOC val"]))})
    print(f"{out}: {len(all_ids):,} masks ({counts['sbd']:,} from SBD, {counts['voc']:,} from VOC's "
          f"SegmentationClass): {counts['written'] + counts['replaced']:,} written, {counts['kept']:,} kept"
          + (f" ({counts['replaced']:,} of those written replaced a different mask)" if counts["replaced"] else ""))
    print(f"{list_path}: {len(train_aug):,} ids ({list_state})")
    return {"mode": "build", "masks": len(all_ids), "from_sbd": counts["sbd"], "from_voc": counts["voc"],
            "written": counts["written"] + counts["replaced"], "replaced": counts["replaced"], "kept": counts["kept"],
            "train_aug": len(train_aug), "list": list_state}


def check(args, aug):
    """Check an existing SegmentationClassAug; write train_aug.txt only if it is missing."""
    voc = check_voc(args.voc)
    voc_hint = "re-extract VOCtrainval_11-May-2012.tar into --voc"
    aug_hint = ("replace the SegmentationClassAug folder (or build it from SBD: --sbd "
                "benchmark_RELEASE/dataset)")
    runtime.need_dir(aug, "SegmentationClassAug folder" if args.aug is None else "--aug folder",
             "pass --aug the downloaded SegmentationClassAug folder, or --sbd SBD's benchmark_RELEASE/dataset "
             "folder to build one")
    val_path, list_path = voc_list(voc, "val"), voc_list(voc, "train_aug")
    val, train = read_list(val_path, voc_hint), read_list(voc_list(voc, "train"), voc_hint)
    if os.path.exists(list_path):
        train_aug, list_state = read_list(list_path, "delete it and rerun to have it made from the mask folder"), None
        dup = len(train_aug) - len(set(train_aug))
        if dup:
            warn(f"{list_path} lists {dup} id(s) twice")
    else:
        have = sorted(f[:-4] for f in os.listdir(aug) if f.endswith(".png") and not f.startswith("."))
        train_aug, list_state = sorted(set(have) - set(val)), "written"
        if not train_aug:
            raise ValueError(f"{aug} holds no mask of an id outside {val_path}: nothing to make train_aug.txt from; "
                             f"{aug_hint}")
    check_lists(train_aug, val, list_path if list_state is None else f"{aug} (its ids)", val_path)
    for i in runtime.progress(sorted(set(train_aug)), "check"):
        hw = jpeg_size(voc, i, list_path if list_state is None else f"{aug} (its ids)")
        path = runtime.need_file(os.path.join(aug, f"{i}.png"), f"mask of train_aug id {i}", aug_hint)
        mask = check_values(datasets.read_mask(path), path, aug_hint)
        check_size(mask, path, hw, voc, i, aug_hint)
    no_mask = [i for i in set(val) | set(train) if not os.path.exists(os.path.join(aug, f"{i}.png"))]
    if no_mask:
        warn(f"{aug} has no mask for {len(no_mask):,} id(s) of VOC's train/val lists (e.g. {sorted(no_mask)[0]}); "
             "a stage that reads their labels from SegmentationClassAug will stop there")
    if list_state == "written":
        list_state = write_list(list_path, train_aug)
    warn_counts({"train_aug": len(train_aug), "train": len(set(train)), "val": len(set(val))})
    print(f"{aug}: checked the masks of {len(set(train_aug)):,} train_aug ids: all there, values in "
          f"0..{NUM_CLASSES} or 255, sizes equal to their JPEGs'; nothing written there")
    print(f"{list_path}: {len(train_aug):,} ids ({list_state or 'kept: it was there'})")
    target = os.path.join(voc, "SegmentationClassAug")
    if not (os.path.exists(target) and os.path.samefile(target, aug)):
        print(f"note: the stages read {target}" + (", a different folder" if os.path.exists(target) else "")
              + f": `ln -s {os.path.abspath(aug)} {target}`" + (" after moving it away" if os.path.exists(target) else ""))
    return {"mode": "check", "train_aug": len(train_aug), "list": list_state or "kept"}


def main(args):
    if args.sbd is not None:
        return build(args)
    aug = args.aug if args.aug is not None else os.path.join(args.voc, "SegmentationClassAug")
    if args.aug is None and not os.path.isdir(aug):
        check_voc(args.voc)
        raise FileNotFoundError(f"{aug} not found, and no --sbd given: pass --sbd SBD's benchmark_RELEASE/dataset "
                                "folder to build it, or --aug a downloaded SegmentationClassAug folder")
    return check(args, aug)


def cli(argv=None):
    """The command line (runtime.run_cli: bad input ends as one `prepare_voc.py: error: ...` line, exit status 1)."""
    return runtime.run_cli(main, build_parser(), argv=argv)


if __name__ == "__main__":
    cli()
