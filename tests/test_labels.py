"""Data as users have it: image-level labels without masks (DATA/labels.json, DATA/cls_labels.npy) and split
lists as other code writes them (DeepLab-style lines, CRLF, extra columns, ids with a space). A labels file
saying what the masks say gives exactly the masks' labels, so a stage trains bit for bit as from the masks;
every refusal names its file."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from semples import datasets, runtime
import make_pseudo
import train_cam
import train_match

CPU = ["--dataset", "toy", "--device", "cpu", "--workers", "0"]
LISTS = os.path.join("ImageSets", "Segmentation")


def copy_world(toy_world, dest):
    """A writable copy of the toy dataset (without its CLIP)."""
    shutil.copytree(toy_world["root"], dest, ignore=shutil.ignore_patterns("tiny_clip.pt"))
    return str(dest)


def mask_labels(root, ids):
    return datasets.derive_labels(root, ids)


def write_json_labels(root, ids, names, values_of):
    with open(os.path.join(root, "labels.json"), "w") as f:
        json.dump({i: [names[v - 1] for v in values_of[i]] for i in ids}, f)


def multi_hot(values, K, dtype=np.float32):
    row = np.zeros(K, dtype)
    row[np.asarray(values, int) - 1] = 1
    return row


def stage(module, argv):
    return module.main(runtime.parse_args(module.build_parser(), module.PRESETS, [str(a) for a in argv]))


# ----------------------------------------------------------------------------------------------
# (a) a labels file made from the masks gives exactly the masks' labels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["json", "npy", "npy int"])
def test_labels_file_from_the_masks_gives_the_same_array(toy_world, tmp_path, kind):
    root, K, names = copy_world(toy_world, tmp_path / "data"), toy_world["num_classes"], toy_world["class_names"]
    splits = {s: datasets.read_ids(root, s) for s in ("train_aug", "train", "val")}
    every = sorted({i for ids in splits.values() for i in ids})
    expected = {s: datasets.load_labels(root, ids, K, require_nonempty=False) for s, ids in splits.items()}
    values = mask_labels(root, every)
    if kind == "json":
        write_json_labels(root, every, names, values)
    else:
        dtype = np.float32 if kind == "npy" else np.int64
        np.save(os.path.join(root, "cls_labels.npy"), {i: multi_hot(values[i], K, dtype) for i in every})
    assert datasets.labels_file(root) == os.path.join(root, "labels.json" if kind == "json" else "cls_labels.npy")
    for s, ids in splits.items():
        got = datasets.load_labels(root, ids, K, require_nonempty=False)
        assert got.dtype == expected[s].dtype == np.float32 and np.array_equal(got, expected[s]), s
    # and with the masks gone, the file alone gives the same array
    shutil.rmtree(os.path.join(root, "SegmentationClass"))
    for s, ids in splits.items():
        assert np.array_equal(datasets.load_labels(root, ids, K, require_nonempty=False), expected[s]), s


def voc_world(root, ids_values, K=20, masks=True):
    """A VOC-layout folder with VOC ids (no class_names.txt: the VOC list), masks holding the given classes."""
    os.makedirs(os.path.join(root, LISTS))
    os.makedirs(os.path.join(root, "SegmentationClass"))
    for i, values in ids_values.items():
        m = np.zeros((8, 8), np.uint8)
        for n, v in enumerate(values):
            m[n, :] = v
        if masks:
            datasets.save_mask(os.path.join(root, "SegmentationClass", f"{i}.png"), m)
    with open(os.path.join(root, LISTS, "train.txt"), "w") as f:
        f.write("".join(i + "\n" for i in ids_values))
    return str(root)


def test_irn_cls_labels_keyed_by_int_ids(tmp_path):
    """IRN's own cls_labels.npy keys "2007_000032" as the int 2007000032; PSA's keys the string. Both read; the
    VOC class list is used without a class_names.txt."""
    want = {"2007_000032": [1, 15], "2007_000039": [20], "2008_000002": [12]}
    root = voc_world(tmp_path / "voc", want)
    ids = datasets.read_ids(root, "train")
    from_masks = datasets.load_labels(root, ids, 20)
    np.save(os.path.join(root, "cls_labels.npy"), {int(i.replace("_", "")): multi_hot(v, 20) for i, v in want.items()})
    assert np.array_equal(datasets.load_labels(root, ids, 20), from_masks)
    os.remove(os.path.join(root, "cls_labels.npy"))
    names = datasets.VOC_CLASSES
    with open(os.path.join(root, "labels.json"), "w") as f:  # CLIP's spelling names VOC's folder name too
        json.dump({"2007_000032": ["aeroplane", "person"], "2007_000039": ["tv monitor"],
                   "2008_000002": [names[11]]}, f)
    assert np.array_equal(datasets.load_labels(root, ids, 20), from_masks)


def test_empty_entry_is_an_image_with_no_class(toy_world, tmp_path):
    root, K, names = copy_world(toy_world, tmp_path / "data"), toy_world["num_classes"], toy_world["class_names"]
    ids = datasets.read_ids(root, "train_aug")
    values = mask_labels(root, ids)
    for i in ids[:2]:
        os.remove(os.path.join(root, "SegmentationClass", f"{i}.png"))
        values[i] = []
    write_json_labels(root, ids, names, values)
    y = datasets.load_labels(root, ids, K, require_nonempty=False)
    assert not y[:2].any() and y[2:].any(1).all()
    with pytest.raises(ValueError, match=f"image {ids[0]} has an empty label row: its entry in .*labels.json"):
        datasets.load_labels(root, ids, K)
    data = datasets.ClsDataset(root, "train_aug", K, 32)
    assert data.ids == ids[2:] and data.left_out == 2 and "labels.json" in data.note("train_aug")


# ----------------------------------------------------------------------------------------------
# (b) the key test: a labels-only world trains bit for bit as the masks' world
# ----------------------------------------------------------------------------------------------
def labels_only_world(toy_world, dest):
    """The toy world whose train_aug masks are deleted (those of train, a subset, are kept for scoring), with a
    labels.json holding the labels of every train_aug image."""
    root = copy_world(toy_world, dest)
    train_aug, train = datasets.read_ids(root, "train_aug"), set(datasets.read_ids(root, "train"))
    write_json_labels(root, train_aug, toy_world["class_names"], mask_labels(root, train_aug))
    gone = [i for i in train_aug if i not in train]
    for i in gone:
        os.remove(os.path.join(root, "SegmentationClass", f"{i}.png"))
    assert gone and train
    return root


def checkpoint_tensors(path):
    ckpt = torch.load(path, weights_only=True)
    flat = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for n, state in ckpt["optimizer"]["state"].items():
        flat.update({f"optimizer.{n}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return flat, ckpt["epoch"]


def test_labels_only_world_trains_bit_for_bit(toy_world, tmp_path):
    worlds = {"masks": toy_world["root"], "labels": labels_only_world(toy_world, tmp_path / "labels_world")}
    for name, root in worlds.items():
        out = tmp_path / name
        stage(train_cam, CPU + ["--data", root, "--out", out / "cam", "--epochs", 1, "--batch_size", 16,
                                "--size", 32])
        stage(train_match, CPU + ["--data", root, "--clip", toy_world["clip"], "--out", out / "match",
                                  "--init", out / "cam" / "checkpoint.pt", "--epochs", 1, "--batch_size", 16])
    for step in ("cam", "match"):
        a, ea = checkpoint_tensors(tmp_path / "masks" / step / "checkpoint.pt")
        b, eb = checkpoint_tensors(tmp_path / "labels" / step / "checkpoint.pt")
        assert ea == eb == 1 and a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # make_pseudo on train_aug takes the labels from the file: the same CAM files (one checkpoint for both)
    S = tmp_path / "masks" / "match" / "checkpoint.pt"
    for name, root in worlds.items():
        stage(make_pseudo, CPU + ["--data", root, "--out", tmp_path / name / "pseudo", "--checkpoint", S,
                                  "--cams_only", "--scales", "1.0", "--batch_size", 16])
    ids = datasets.read_ids(toy_world["root"], "train_aug")
    for i in ids:
        with np.load(tmp_path / "masks" / "pseudo" / "cams" / f"{i}.npz") as a, \
                np.load(tmp_path / "labels" / "pseudo" / "cams" / f"{i}.npz") as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), i
    # the train split (scored) keeps its masks and reads them
    train = datasets.read_ids(worlds["labels"], "train")
    assert all(os.path.exists(os.path.join(datasets.mask_dir(worlds["labels"]), f"{i}.png")) for i in train)


# ----------------------------------------------------------------------------------------------
# (c) every refusal names its file
# ----------------------------------------------------------------------------------------------
def _no_mask_no_entry(root, ids, names, values):
    write_json_labels(root, ids[1:], names, values)
    os.remove(os.path.join(root, "SegmentationClass", f"{ids[0]}.png"))
    return ["image {0} has no label", "{root}/labels.json", "SegmentationClass/{0}.png"]


def _no_mask_no_file(root, ids, names, values):
    os.remove(os.path.join(root, "SegmentationClass", f"{ids[0]}.png"))
    return ["image {0} has no label", "{root}/labels.json", "cls_labels.npy", "SegmentationClass/{0}.png"]


def _unknown_class(root, ids, names, values):
    write_json_labels(root, ids, names, values)
    table = json.load(open(os.path.join(root, "labels.json")))
    table[ids[3]] = [names[0], "unicorn"]
    json.dump(table, open(os.path.join(root, "labels.json"), "w"))
    return ["{root}/labels.json", "'unicorn'", "not a class", names[0], names[1]]


def _not_a_list(root, ids, names, values):
    json.dump({ids[0]: names[0]}, open(os.path.join(root, "labels.json"), "w"))
    return ["{root}/labels.json", "image '{0}'", "list of class names"]


def _not_json(root, ids, names, values):
    open(os.path.join(root, "labels.json"), "w").write("{toy_000000: [cat]}")
    return ["{root}/labels.json", "not valid JSON"]


def _row_length(root, ids, names, values):
    K = len(names)
    table = {i: multi_hot(values[i], K) for i in ids}
    table[ids[2]] = np.concatenate([[0.0], table[ids[2]]])  # a background column first
    np.save(os.path.join(root, "cls_labels.npy"), table)
    return ["{root}/cls_labels.npy", "image {2}", f"shape ({K + 1},)", f"expected ({K},)", "background column"]


def _row_not_multi_hot(root, ids, names, values):
    table = {i: multi_hot(values[i], len(names)) for i in ids}
    table[ids[1]] = table[ids[1]] * 0.5
    np.save(os.path.join(root, "cls_labels.npy"), table)
    return ["{root}/cls_labels.npy", "image {1}", "0 or 1 only"]


def _npy_not_a_dict(root, ids, names, values):
    np.save(os.path.join(root, "cls_labels.npy"), np.zeros((3, len(names))))
    return ["{root}/cls_labels.npy", "must hold a dict"]


def _disagree(root, ids, names, values):
    other = dict(values)
    extra = next(v for v in range(1, len(names) + 1) if v not in values[ids[4]])
    other[ids[4]] = sorted(values[ids[4]] + [extra])
    write_json_labels(root, ids, names, other)
    said = ", ".join(names[v - 1] for v in other[ids[4]])
    held = ", ".join(names[v - 1] for v in values[ids[4]])
    return ["image {4}", "{root}/labels.json", f"says [{said}]", "SegmentationClass/{4}.png", f"holds [{held}]"]


def _both_files(root, ids, names, values):
    write_json_labels(root, ids, names, values)
    np.save(os.path.join(root, "cls_labels.npy"), {i: multi_hot(values[i], len(names)) for i in ids})
    return ["{root}/labels.json", "{root}/cls_labels.npy", "keep one"]


REFUSALS = [  # (kind, set-up writing the bad input and returning the message's fragments)
    ("neither entry nor mask", _no_mask_no_entry),
    ("no mask and no labels file", _no_mask_no_file),
    ("unknown class", _unknown_class),
    ("entry not a list", _not_a_list),
    ("labels.json not JSON", _not_json),
    ("multi-hot row of the wrong length", _row_length),
    ("multi-hot row not 0/1", _row_not_multi_hot),
    ("cls_labels.npy not a dict", _npy_not_a_dict),
    ("labels and mask disagree", _disagree),
    ("both labels files", _both_files),
]


@pytest.mark.parametrize("kind,setup", REFUSALS, ids=[k for k, _ in REFUSALS])
def test_refusals_name_their_file(toy_world, tmp_path, kind, setup, capsys, monkeypatch):
    root, K, names = copy_world(toy_world, tmp_path / "data"), toy_world["num_classes"], toy_world["class_names"]
    ids = datasets.read_ids(root, "train_aug")
    fragments = [f.format(*ids, root=root) for f in setup(root, ids, names, mask_labels(root, ids))]
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        datasets.load_labels(root, ids, K)
    assert all(f in str(e.value) for f in fragments), (fragments, str(e.value))
    # a stage says it in one line, as `script: error: ...`
    argv = CPU + ["--data", root, "--out", tmp_path / "cam", "--epochs", 1, "--size", 32, "--batch_size", 16]
    monkeypatch.setattr(sys, "argv", ["train_cam.py"] + [str(a) for a in argv])
    parser = train_cam.build_parser()
    parser.prog = "train_cam.py"
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        runtime.run_cli(train_cam.main, parser, train_cam.PRESETS)
    err = capsys.readouterr().err
    assert ex.value.code == 1 and err.startswith("train_cam.py: error: ") and "Traceback" not in err
    assert err.count("\n") == 1 and all(f in err for f in fragments), err


# ----------------------------------------------------------------------------------------------
# (d) split lists as other code writes them
# ----------------------------------------------------------------------------------------------
def list_world(tmp_path, text, images=()):
    root = tmp_path / "data"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    for name in images:
        (root / "JPEGImages" / name).write_bytes(b"")
    (root / "ImageSets" / "Segmentation" / "l.txt").write_bytes(text.encode())
    return str(root)


@pytest.mark.parametrize("text,want,images", [
    ("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
     "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n", ["2007_000032", "2007_000039"], ()),
    ("JPEGImages/a.jpg SegmentationClassAug/a.png\nJPEGImages/b.png SegmentationClass/b.png\n", ["a", "b"], ()),
    ("/JPEGImages/a.jpg\nJPEGImages/b.jpg\n", ["a", "b"], ()),
    ("a\r\nb\r\n\r\n", ["a", "b"], ()),
    ("a  \t\n\n   \nb \r\n", ["a", "b"], ()),
    ("\ufeffa\nb\n", ["a", "b"], ()),
    ("2008_000001 -1\n2008_000002  1\n2008_000003 0\n", ["2008_000001", "2008_000002", "2008_000003"], ()),
    ("my photo 1\nplain\nmy photo 2 \r\n", ["my photo 1", "plain", "my photo 2"], ("my photo 1.jpg", "my photo 2.png")),
    ("/JPEGImages/my photo.jpg /SegmentationClass/my photo.png\n", ["my photo"], ()),
], ids=["deeplab", "deeplab no slash", "image path only", "crlf", "trailing blanks", "bom", "extra columns",
        "id with a space", "deeplab id with a space"])
def test_lists_as_other_code_writes_them(tmp_path, text, want, images):
    assert datasets.read_ids(list_world(tmp_path, text, images), "l") == want


def test_a_space_without_such_an_image_is_a_column(tmp_path):
    assert datasets.read_ids(list_world(tmp_path, "my photo\n", ("my.jpg",)), "l") == ["my"]


@pytest.mark.parametrize("text,lines", [
    ("a\nb\na\n", (1, 3)),
    ("a\r\n\r\nb\r\n/JPEGImages/b.jpg /SegmentationClassAug/b.png\r\n", (3, 4)),
    ("2008_000001 -1\n2008_000001 1\n", (1, 2)),
])
def test_duplicated_id_is_refused(tmp_path, text, lines):
    root = list_world(tmp_path, text)
    with pytest.raises(ValueError) as e:
        datasets.read_ids(root, "l")
    msg = str(e.value)
    assert os.path.join(root, "ImageSets", "Segmentation", "l.txt") in msg, msg
    assert f"line {lines[0]} and line {lines[1]}" in msg and "twice" in msg, msg


@pytest.mark.parametrize("text", ["", "\r\n  \n\t\n"])
def test_empty_list_is_refused(tmp_path, text):
    root = list_world(tmp_path, text)
    with pytest.raises(ValueError, match="split list .*l.txt is empty"):
        datasets.read_ids(root, "l")


def test_toy_lists_unchanged(toy_world):
    """The toy world's plain lists read as before: one id a line, in order."""
    root = toy_world["root"]
    for split in ("train_aug", "train", "val"):
        with open(os.path.join(root, LISTS, f"{split}.txt")) as f:
            assert datasets.read_ids(root, split) == [line.split()[0] for line in f if line.strip()]
