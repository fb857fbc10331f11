"""tools/prepare_voc.py on a tiny synthetic VOC 2012 + SBD pair: the train_aug list, the masks (VOC's own where
VOC has one, SBD's .mat otherwise), idempotence, the refusals, and the check-only mode."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from semples import datasets
from tools import prepare_voc

pytestmark = pytest.mark.smoke

VOC_TRAIN = ["2007_000001", "2007_000002"]
VOC_VAL = ["2007_000003", "2007_000004"]
SBD_TRAIN = ["2008_000001", "2008_000002", "2007_000002", "2007_000004"]  # SBD train holds a VOC val id, as the real one
SBD_VAL = ["2008_000003", "2007_000003"]
EXTRA_JPEG = "2009_000001"  # in no list: VOC's JPEGImages holds many more images than its lists
EXPECTED = sorted((set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL))
SBD_ONLY = sorted((set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_TRAIN) - set(VOC_VAL))
ALL_IDS = sorted(set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN) | set(VOC_VAL))


def size_of(n):
    return (9 + n % 3, 12 + n % 4)  # (H, W), H != W: a transposed mask is caught


def write_list(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{i}\n" for i in ids))


def write_mat(path, seg):
    """A cls/{id}.mat in SBD's structure: the struct GTcls with Boundaries (a 20x1 cell of sparse edge maps),
    Segmentation (HxW uint8) and CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix((seg == k + 1).astype(np.uint8))
    present = np.array([v for v in np.unique(seg) if v], dtype=np.uint8).reshape(-1, 1)
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg.astype(np.uint8),
                                      "CategoriesPresent": present}})


@pytest.fixture
def data(tmp_path):
    """{"voc", "sbd", "voc_masks": {id: array}, "sbd_masks": {id: array}}, the folders in their real layout."""
    rng = np.random.default_rng(0)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", sbd / "cls"):
        d.mkdir(parents=True)
    voc_masks, sbd_masks = {}, {}
    for n, i in enumerate(ALL_IDS + [EXTRA_JPEG]):
        h, w = size_of(n)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        if i in VOC_TRAIN + VOC_VAL:
            m = rng.integers(0, 21, (h, w)).astype(np.uint8)
            m[0, :] = 255  # VOC's boundary band
            voc_masks[i] = m
            datasets.save_mask(str(voc / "SegmentationClass" / f"{i}.png"), m)
        if i in SBD_TRAIN + SBD_VAL:
            m = rng.integers(0, 21, (h, w)).astype(np.uint8)  # differs from VOC's mask of the same id
            sbd_masks[i] = m
            write_mat(str(sbd / "cls" / f"{i}.mat"), m)
    write_list(str(voc / "ImageSets" / "Segmentation" / "train.txt"), VOC_TRAIN)
    write_list(str(voc / "ImageSets" / "Segmentation" / "val.txt"), VOC_VAL)
    write_list(str(sbd / "train.txt"), SBD_TRAIN)
    write_list(str(sbd / "val.txt"), SBD_VAL)
    return {"voc": str(voc), "sbd": str(sbd), "voc_masks": voc_masks, "sbd_masks": sbd_masks}


def run(argv):
    return prepare_voc.main(prepare_voc.build_parser().parse_args([str(a) for a in argv]))


def build(data):
    return run(["--voc", data["voc"], "--sbd", data["sbd"]])


def aug_dir(data):
    return os.path.join(data["voc"], "SegmentationClassAug")


def list_path(data):
    return os.path.join(data["voc"], "ImageSets", "Segmentation", "train_aug.txt")


def read_list(path):
    with open(path) as f:
        return f.read().split("\n")[:-1]


def mtimes(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}


def test_synthetic_mat_has_sbd_nesting(data):
    """loadmat sees the synthetic .mat as it sees SBD's: a 1x1 struct GTcls, Segmentation an HxW uint8 map."""
    i = SBD_ONLY[0]
    mat = scipy.io.loadmat(os.path.join(data["sbd"], "cls", f"{i}.mat"))
    gt = mat["GTcls"]
    assert gt.shape == (1, 1) and set(gt.dtype.names) == {"Boundaries", "Segmentation", "CategoriesPresent"}
    seg = gt[0, 0]["Segmentation"]
    assert seg.dtype == np.uint8 and seg.shape == data["sbd_masks"][i].shape
    assert np.array_equal(seg, data["sbd_masks"][i])
    assert gt[0, 0]["Boundaries"].shape == (20, 1)
    squeezed = scipy.io.loadmat(os.path.join(data["sbd"], "cls", f"{i}.mat"), squeeze_me=True, struct_as_record=False)
    assert np.array_equal(squeezed["GTcls"].Segmentation, data["sbd_masks"][i])


def test_build(data, capsys):
    res = build(data)
    out = capsys.readouterr()
    assert read_list(list_path(data)) == EXPECTED
    assert not set(EXPECTED) & set(VOC_VAL)
    assert sorted(f[:-4] for f in os.listdir(aug_dir(data))) == ALL_IDS
    for i in ALL_IDS:
        path = os.path.join(aug_dir(data), f"{i}.png")
        with Image.open(path) as im:
            assert im.mode == "P" and im.getpalette()[:3 * 21] == datasets.voc_palette()[:3 * 21]
        want = data["voc_masks"][i] if i in data["voc_masks"] else data["sbd_masks"][i]  # VOC's own wins
        assert np.array_equal(datasets.read_mask(path), want), i
    assert res == {"mode": "build", "masks": len(ALL_IDS), "from_sbd": len(SBD_ONLY), "from_voc": 4,
                   "written": len(ALL_IDS), "replaced": 0, "kept": 0, "train_aug": len(EXPECTED), "list": "written"}
    assert f"{len(SBD_ONLY)} from SBD, 4 from VOC" in out.out and f"{len(ALL_IDS)} written, 0 kept" in out.out
    assert f"{len(EXPECTED)} ids (written)" in out.out
    assert "warning: train_aug has 5 ids; the full VOC 2012 + SBD has 10,582" in out.err  # a subset: warned only
    # The stages see the result: labels come from SegmentationClassAug, every train_aug id has one
    assert datasets.mask_dir(data["voc"]) == aug_dir(data)
    assert datasets.read_ids(data["voc"], "train_aug") == EXPECTED


def test_second_run_writes_nothing(data, capsys):
    build(data)
    before, list_before = mtimes(aug_dir(data)), os.stat(list_path(data)).st_mtime_ns
    capsys.readouterr()
    res = build(data)
    assert f"0 written, {len(ALL_IDS)} kept" in capsys.readouterr().out
    assert res["written"] == 0 and res["kept"] == len(ALL_IDS) and res["list"] == "kept"
    assert mtimes(aug_dir(data)) == before and os.stat(list_path(data)).st_mtime_ns == list_before
    # A mask changed by hand is put back, and said to be
    i = SBD_ONLY[0]
    datasets.save_mask(os.path.join(aug_dir(data), f"{i}.png"), np.zeros_like(data["sbd_masks"][i]))
    res = build(data)
    assert res["written"] == 1 and res["replaced"] == 1
    assert np.array_equal(datasets.read_mask(os.path.join(aug_dir(data), f"{i}.png")), data["sbd_masks"][i])


def expect_error(argv, pattern, kind=ValueError):
    with pytest.raises(kind, match=pattern):
        run(argv)


def test_refusals(data, tmp_path):
    voc, sbd = data["voc"], data["sbd"]
    # Missing folders, with a hint when a parent folder was given
    expect_error(["--voc", tmp_path / "nope", "--sbd", sbd], re.escape(str(tmp_path / "nope")), FileNotFoundError)
    expect_error(["--voc", os.path.dirname(voc), "--sbd", sbd], re.escape(f"pass --voc {voc}"), FileNotFoundError)
    expect_error(["--voc", voc, "--sbd", os.path.dirname(sbd)], re.escape(f"pass --sbd {sbd}"), FileNotFoundError)
    expect_error(["--voc", voc], "SegmentationClassAug not found, and no --sbd given", FileNotFoundError)
    # A .mat without GTcls.Segmentation (an inst/ file: GTinst)
    mat = os.path.join(sbd, "cls", f"{SBD_ONLY[0]}.mat")
    scipy.io.savemat(mat, {"GTinst": {"Segmentation": np.zeros((3, 3), np.uint8)}})
    expect_error(["--voc", voc, "--sbd", sbd], re.escape(mat) + ".*no GTcls")
    scipy.io.savemat(mat, {"GTcls": {"Boundaries": np.zeros((2, 2))}})
    expect_error(["--voc", voc, "--sbd", sbd], re.escape(mat) + ".*without a Segmentation")
    with open(mat, "wb") as f:
        f.write(b"not a mat file")
    expect_error(["--voc", voc, "--sbd", sbd], "cannot read SBD mask " + re.escape(mat))
    # A mask of another size than its JPEG (SBD's, then VOC's)
    write_mat(mat, np.zeros((5, 5), np.uint8))
    expect_error(["--voc", voc, "--sbd", sbd], re.escape(mat) + " is 5x5.*" + re.escape(SBD_ONLY[0] + ".jpg"))
    write_mat(mat, data["sbd_masks"][SBD_ONLY[0]])
    png = os.path.join(voc, "SegmentationClass", f"{VOC_VAL[0]}.png")
    datasets.save_mask(png, np.zeros((4, 4), np.uint8))
    expect_error(["--voc", voc, "--sbd", sbd], re.escape(png) + " is 4x4")
    datasets.save_mask(png, data["voc_masks"][VOC_VAL[0]])
    # A value outside 0..20, 255
    bad = data["sbd_masks"][SBD_ONLY[1]].copy()
    bad[0, 0] = 21
    write_mat(os.path.join(sbd, "cls", f"{SBD_ONLY[1]}.mat"), bad)
    expect_error(["--voc", voc, "--sbd", sbd], re.escape(os.path.join(sbd, "cls", f"{SBD_ONLY[1]}.mat")) + ".* 21")
    write_mat(os.path.join(sbd, "cls", f"{SBD_ONLY[1]}.mat"), data["sbd_masks"][SBD_ONLY[1]])
    # An id in a list with no JPEG, named with its list
    jpeg = os.path.join(voc, "JPEGImages", f"{SBD_VAL[0]}.jpg")
    os.rename(jpeg, jpeg + ".away")
    expect_error(["--voc", voc, "--sbd", sbd], re.escape(jpeg) + ".*" + re.escape(os.path.join(sbd, "val.txt")),
                 FileNotFoundError)
    os.rename(jpeg + ".away", jpeg)
    # A listed SBD id without its .mat; a VOC list id without its PNG
    os.remove(mat)
    expect_error(["--voc", voc, "--sbd", sbd], re.escape(mat), FileNotFoundError)
    write_mat(mat, data["sbd_masks"][SBD_ONLY[0]])
    os.remove(png)
    expect_error(["--voc", voc, "--sbd", sbd], re.escape(png) + ".*" + re.escape("val.txt"), FileNotFoundError)
    datasets.save_mask(png, data["voc_masks"][VOC_VAL[0]])
    assert not os.path.exists(list_path(data))  # the list comes last: a run that stopped wrote none
    build(data)  # all put back: it runs
    assert read_list(list_path(data)) == EXPECTED


def test_check_mode(data, tmp_path, capsys):
    build(data)
    os.remove(list_path(data))
    before = mtimes(aug_dir(data))
    capsys.readouterr()
    res = run(["--voc", data["voc"]])  # no --sbd: the existing SegmentationClassAug is checked
    out = capsys.readouterr().out
    assert res == {"mode": "check", "train_aug": len(EXPECTED), "list": "written"}
    assert read_list(list_path(data)) == EXPECTED  # the folder's ids minus val: the same list
    assert mtimes(aug_dir(data)) == before and "nothing written there" in out and "note:" not in out
    list_before = os.stat(list_path(data)).st_mtime_ns
    assert run(["--voc", data["voc"]])["list"] == "kept"
    assert os.stat(list_path(data)).st_mtime_ns == list_before

    # A downloaded folder elsewhere (--aug): checked, and the user told where the stages look
    elsewhere = str(tmp_path / "SegmentationClassAug")
    shutil.move(aug_dir(data), elsewhere)
    os.remove(list_path(data))
    capsys.readouterr()
    assert run(["--voc", data["voc"], "--aug", elsewhere])["list"] == "written"
    assert f"ln -s {elsewhere} {aug_dir(data)}" in capsys.readouterr().out
    assert not os.path.exists(aug_dir(data)) and read_list(list_path(data)) == EXPECTED

    # Refusals: a missing mask, a bad value, another size, a list holding val ids
    i = EXPECTED[0]
    mask = os.path.join(elsewhere, f"{i}.png")
    os.rename(mask, mask + ".away")
    expect_error(["--voc", data["voc"], "--aug", elsewhere], re.escape(mask), FileNotFoundError)
    os.rename(mask + ".away", mask)
    good = datasets.read_mask(mask)
    datasets.save_mask(mask, np.full_like(good, 30))
    expect_error(["--voc", data["voc"], "--aug", elsewhere], re.escape(mask) + ".* 30")
    datasets.save_mask(mask, good.T)
    expect_error(["--voc", data["voc"], "--aug", elsewhere], re.escape(mask) + " is .*but its image")
    datasets.save_mask(mask, good)
    write_list(list_path(data), EXPECTED + [VOC_VAL[0]])
    expect_error(["--voc", data["voc"], "--aug", elsewhere], re.escape(list_path(data)) + " holds 1 id")
    expect_error(["--voc", data["voc"], "--aug", tmp_path / "none"], re.escape(str(tmp_path / "none")),
                 FileNotFoundError)


def test_command_line(data, tmp_path):
    """The script's own command line: bad input is one error line and exit status 1; --sbd and --aug exclude
    each other."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "prepare_voc.py")
    proc = subprocess.run([sys.executable, script, "--voc", str(tmp_path / "nope"), "--sbd", data["sbd"]],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("prepare_voc.py: error: --voc folder ")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        prepare_voc.build_parser().parse_args(["--sbd", "a", "--aug", "b"])
