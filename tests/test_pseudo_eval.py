"""Tests of make_pseudo.py (CAMs -> threshold -> CRF -> palette PNGs) and eval_miou.py (mIoU, threshold
sweep), and of their libraries semples/cams.py and semples/metrics.py. Oracles: torchmetrics' multiclass Jaccard index,
brute-force per-threshold evaluation, planted answers, and ground truth that a CRF must get closer to."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_jaccard_index

from semples import datasets, metrics, network, runtime
from semples.cams import MASS, crf_probs, dense_crf, load_cams, mass_thresholds, pseudo_mask, save_cams
import eval_miou
import make_pseudo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def evaluate(capsys, *argv):
    """eval_miou.py in this process (a subprocess costs seconds of imports); returns its stdout."""
    capsys.readouterr()
    eval_miou.main(runtime.parse_args(eval_miou.build_parser(), eval_miou.PRESETS, [str(a) for a in argv]))
    return capsys.readouterr().out


def last_miou(stdout):
    last = stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"mIoU: (\d+\.\d\d)", last)
    assert m, f"last line is not 'mIoU: xx.xx': {last!r}"
    return float(m.group(1))


def make_root(path, ids, num_fg, split="train"):
    """A VOC-layout folder with a split list and K class names (images / masks are added by the caller)."""
    os.makedirs(os.path.join(path, "ImageSets", "Segmentation"), exist_ok=True)
    os.makedirs(os.path.join(path, "SegmentationClass"), exist_ok=True)
    with open(os.path.join(path, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    with open(os.path.join(path, "class_names.txt"), "w") as f:
        f.write("\n".join(f"class{k}" for k in range(1, num_fg + 1)) + "\n")
    return str(path)


def random_maps(rng, C, sizes, absent=()):
    """(gt, pred) pairs of blocky random class maps; gt has 255 bands; every class but `absent` appears."""
    pairs = []
    allowed = np.array([c for c in range(C) if c not in absent])
    for h, w in sizes:
        gt = allowed[rng.integers(0, len(allowed), (h // 4 + 1, w // 4 + 1))].repeat(4, 0).repeat(4, 1)[:h, :w]
        gt = gt.astype(np.uint8)
        pred = gt.copy()
        flip = rng.random((h, w)) < 0.3
        pred[flip] = allowed[rng.integers(0, len(allowed), flip.sum())]
        gt[rng.random((h, w)) < 0.05] = 255
        pairs.append((gt, pred))
    return pairs


def tm_reference(pairs, C, average):
    target = torch.cat([torch.from_numpy(g.astype(np.int64)).flatten() for g, _ in pairs])
    preds = torch.cat([torch.from_numpy(p.astype(np.int64)).flatten() for _, p in pairs])
    return multiclass_jaccard_index(preds, target, num_classes=C, ignore_index=255, average=average).numpy()


# ----------------------------------------------------------------------------------------------
# eval_miou: the metric
# ----------------------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize("absent", [(), (3,)])
def test_miou_equals_torchmetrics(tmp_path, capsys, absent):
    rng = np.random.default_rng(0)
    C, sizes = 6, [(40, 52), (33, 47), (64, 64), (20, 90), (48, 36)]
    pairs = random_maps(rng, C, sizes, absent)
    ids = [f"im{n}" for n in range(len(pairs))]
    root = make_root(tmp_path / "data", ids, C - 1)
    for i, (gt, pred) in zip(ids, pairs):
        datasets.save_mask(os.path.join(root, "SegmentationClass", f"{i}.png"), gt)
        Image.fromarray(pred).save(tmp_path / f"{i}.png")  # grey (L) predictions are accepted too
    ref_macro = 100 * float(tm_reference(pairs, C, "macro"))
    ref_per_class = tm_reference(pairs, C, "none")

    conf = sum(metrics.confusion_matrix(g, p, C) for g, p in pairs)
    miou, iou = metrics.miou_from_confusion(conf)
    assert miou * 100 == pytest.approx(ref_macro, abs=1e-4)
    for c in range(C):
        if c in absent:
            assert np.isnan(iou[c])  # absent from gt and pred everywhere: n/a, not in the mean
        else:
            assert iou[c] == pytest.approx(float(ref_per_class[c]), abs=1e-6)
    acc = sum((g == p)[g != 255].sum() for g, p in pairs) / sum((g != 255).sum() for g, _ in pairs)
    assert metrics.pixel_accuracy(conf) == pytest.approx(acc)

    argv = ["--dataset", "toy", "--data", root, "--pred", tmp_path, "--workers", 0 if absent else 2,
            "--chunk", 2, "--json", tmp_path / "res.json"]
    if absent:
        stdout = evaluate(capsys, *argv)
    else:  # the command line itself, with a process pool
        out = run("eval_miou.py", *argv)
        assert out.returncode == 0, out.stderr
        stdout = out.stdout
    assert last_miou(stdout) == pytest.approx(ref_macro, abs=0.006)
    res = json.load(open(tmp_path / "res.json"))
    assert np.array_equal(np.array(res["confusion"]), conf)
    assert res["miou"] == pytest.approx(ref_macro, abs=1e-4) and res["num_images"] == len(ids)
    assert all((res["iou"][f"class{c}"] is None) == (c in absent) for c in range(1, C))


def _planted_cams(rng, h, w, classes, t):
    """CAMs whose argmax over [t, cams] is exactly the gt: object pixels score in (t+0.005, 1], others
    below t-0.005, so t is the unique best threshold of a 0.01 grid."""
    gt = np.zeros((h, w), np.uint8)
    cams = rng.uniform(0, t - 0.005, (len(classes), h, w)).astype(np.float32)
    for n, c in enumerate(classes):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        gt[y0:y0 + h // 2, x0:x0 + w // 2] = c
    for n, c in enumerate(classes):
        obj = gt == c
        cams[n][obj] = rng.uniform(t + 0.005, 1, obj.sum())
    gt[rng.random((h, w)) < 0.02] = 255
    return gt, cams


@pytest.mark.smoke
def test_sweep_finds_planted_threshold(tmp_path, capsys):
    rng = np.random.default_rng(1)
    C, t = 5, 0.45
    ids = [f"im{n}" for n in range(6)]
    root = make_root(tmp_path / "data", ids, C - 1)
    cam_dir = tmp_path / "cams"
    for n, i in enumerate(ids):
        classes = sorted(rng.choice(np.arange(1, C), size=1 + n % 3, replace=False).tolist())
        gt, cams = _planted_cams(rng, 30 + n, 40, classes, t)
        datasets.save_mask(os.path.join(root, "SegmentationClass", f"{i}.png"), gt)
        save_cams(str(cam_dir / f"{i}.npz"), cams, classes, gt.shape)
    stdout = evaluate(capsys, "--dataset", "toy", "--data", root, "--cams", cam_dir, "--workers", 0)
    assert stdout.splitlines()[-2] == "best threshold: 0.45"
    assert last_miou(stdout) == 100.0
    lines = dict(l.split() for l in stdout.splitlines() if re.fullmatch(r"\s*0\.\d\d\s+\d+\.\d\d", l))
    assert float(lines["0.44"]) < 100 and float(lines["0.46"]) < 100 and len(lines) == 91  # 0.05..0.95
    assert "edge of the sweep" not in capsys.readouterr().err
    narrow = evaluate(capsys, "--dataset", "toy", "--data", root, "--cams", cam_dir, "--workers", 0,
                      "--t_start", 0.30, "--t_end", 0.40)
    assert narrow.splitlines()[-2] == "best threshold: 0.40"
    eval_miou.main(runtime.parse_args(eval_miou.build_parser(), eval_miou.PRESETS, [
        "--dataset", "toy", "--data", str(root), "--cams", str(cam_dir), "--workers", "0", "--t_start", "0.30",
        "--t_end", "0.40"]))
    assert "edge of the sweep" in capsys.readouterr().err  # the optimum may lie outside: say so


@pytest.mark.smoke
def test_sweep_equals_thresholded_pseudo_masks():
    """The one-pass sweep gives, for every threshold, the confusion of make_pseudo's argmax masks."""
    rng = np.random.default_rng(2)
    C, thresholds = 6, np.round(np.arange(0.2, 0.81, 0.05), 2)
    for classes in ([2], [1, 4, 5], []):
        cams = rng.random((len(classes), 17, 23)).astype(np.float16).astype(np.float32)
        cams[:, :2, :2] = 0.5  # ties with the threshold 0.5 go to the background, both sides
        gt = rng.integers(0, C, (17, 23)).astype(np.uint8)
        gt[0] = 255
        sweep = metrics.sweep_confusion(gt, cams, classes, thresholds, C)
        for n, t in enumerate(thresholds):
            mask = pseudo_mask(cams, np.array(classes, int), t)
            assert np.array_equal(sweep[n], metrics.confusion_matrix(gt, mask, C)), (classes, t)


@pytest.mark.smoke
def test_mass_threshold_keeps_each_cams_area():
    """--bg_threshold mass: each class's hard mask has the area of its soft mask (the CAM's mean), whatever the
    CAM's shape; a CAM made more compact (the same object, values squared) gets a lower threshold and keeps its
    object, where a constant threshold cuts into it; of two classes claiming a pixel, the one further above its
    own threshold wins."""
    yy, xx = np.mgrid[:64, :64] / 63.0
    blob = np.exp(-((yy - 0.4) ** 2 + (xx - 0.5) ** 2) / 0.05)  # one smooth object
    for cam in (blob, blob ** 2, blob ** 4, np.clip(blob * 1.5, 0, 1)):
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        t = mass_thresholds(cam[None])[0]
        area = (pseudo_mask(cam[None], np.array([3]), MASS) == 3).mean()
        assert abs(area - cam.mean()) < 2 / cam.size + 1e-9, (area, cam.mean())  # quantile ties: a pixel or two
        assert np.isclose((cam > t).mean(), cam.mean(), atol=2 / cam.size)
    soft, sharp = blob, blob ** 2
    assert mass_thresholds(sharp[None])[0] < mass_thresholds(soft[None])[0]  # compact: lower threshold
    # a constant threshold keeps less of the sharper map; mass keeps a share of each equal to its mean
    assert (sharp > 0.5).mean() < (soft > 0.5).mean()
    # two classes: a weak wide map and a strong narrow one; each wins where it is further above its threshold
    two = np.stack([np.clip(blob * 1.2, 0, 1), np.roll(blob, 20, axis=1) ** 3])
    mask = pseudo_mask(two, np.array([1, 2]), MASS)
    t = mass_thresholds(two)
    lift = np.where(two >= t[:, None, None], 0.5 + 0.5 * (two - t[:, None, None]) / (1 - t[:, None, None]), 0)
    want = np.where(lift.max(0) > 0.5, lift.argmax(0) + 1, 0)
    assert np.array_equal(mask, want) and set(np.unique(mask)) == {0, 1, 2}
    # an all-zero map (a labelled class S sees nowhere) leaves the image to the background, not to that class
    assert (pseudo_mask(np.zeros((1, 8, 8)), np.array([1]), MASS) == 0).all()
    # an image with no labelled class (left out of training, still in the list): all background, no error
    assert (pseudo_mask(np.zeros((0, 8, 8), np.float32), np.zeros(0, int), MASS) == 0).all()


def test_bad_input_names_the_file(tmp_path, capsys):
    C, ids = 4, ["a", "b"]
    root = make_root(tmp_path / "data", ids, C - 1)
    pred = tmp_path / "pred"
    for i in ids:
        datasets.save_mask(os.path.join(root, "SegmentationClass", f"{i}.png"), np.ones((8, 10), np.uint8))
        datasets.save_mask(str(pred / f"{i}.png"), np.ones((8, 10), np.uint8))
    argv = ["--dataset", "toy", "--data", root, "--pred", pred, "--workers", 0]
    assert last_miou(evaluate(capsys, *argv)) == 100.0

    def fails(name, array, match):
        datasets.save_mask(str(pred / name), array)
        with pytest.raises(ValueError, match=match) as e:
            evaluate(capsys, *argv)
        assert str(pred / name) in str(e.value)
        datasets.save_mask(str(pred / name), np.ones((8, 10), np.uint8))

    fails("b.png", np.ones((8, 11), np.uint8), "size")
    fails("a.png", np.full((8, 10), 4, np.uint8), "outside 0..3")
    fails("a.png", np.full((8, 10), 255, np.uint8), "outside 0..3")  # 255 is only an ignore value in the gt
    datasets.save_mask(os.path.join(root, "SegmentationClass", "a.png"), np.full((8, 10), 9, np.uint8))
    with pytest.raises(ValueError, match="ground truth holds value 9"):
        evaluate(capsys, *argv)
    os.remove(pred / "b.png")
    out = run("eval_miou.py", *argv)  # the command line: a non-zero exit naming the missing file
    assert out.returncode != 0 and "missing" in out.stderr and str(pred / "b.png") in out.stderr, out.stderr
    with pytest.raises(ValueError, match="x.png"):
        metrics.confusion_matrix(np.full((3, 3), 7, np.uint8), np.zeros((3, 3), np.uint8), C, "x.png")
    with pytest.raises(ValueError, match="cam.npz"):
        metrics.sweep_confusion(np.zeros((3, 3)), np.zeros((1, 3, 4)), [1], [0.5], C, "cam.npz")


# ----------------------------------------------------------------------------------------------
# make_pseudo: the CRF
# ----------------------------------------------------------------------------------------------
def test_crf_improves_a_noisy_mask():
    rng = np.random.default_rng(3)
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    gt = np.zeros((h, w), np.int64)
    gt[((yy - 45) / 28) ** 2 + ((xx - 40) / 24) ** 2 < 1] = 1
    gt[20:80, 75:118] = 2
    colours = np.array([[90, 140, 70], [200, 40, 40], [40, 60, 190]], float)
    image = np.clip(colours[gt] + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    noisy = gt.copy()
    noisy[40:60, 20:36] = 0  # a hole in the ellipse
    noisy[10:20, 5:15] = 2  # a false blob
    noisy[:, 70:75][gt[:, 75:80] == 2] = 2  # the rectangle's edge pushed 5 px outwards
    for _ in range(25):  # scattered small blobs
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        noisy[y:y + 3, x:x + 3] = rng.integers(0, 3)
    refined = dense_crf(image, noisy, 3, gt_prob=0.7)
    assert refined.shape == gt.shape and refined.dtype == np.int64

    def scores(pred):
        conf = metrics.confusion_matrix(gt, pred, 3)
        return metrics.miou_from_confusion(conf)[0], metrics.pixel_accuracy(conf)
    (m0, a0), (m1, a1) = scores(noisy), scores(refined)
    assert m1 > m0 + 0.05 and a1 > a0 + 0.03, (m0, m1, a0, a1)
    # the probability form (train_seg.py's post-processing) agrees on clean input
    probs = np.eye(3, dtype=np.float32)[gt].transpose(2, 0, 1) * 0.8 + 0.2 / 3
    assert (dense_crf(image, probs) == gt).mean() > 0.98
    assert crf_probs(image, probs).shape == (3, h, w)
    with pytest.raises(ValueError, match="differ"):
        dense_crf(image, gt[:, :5], 3)


# ----------------------------------------------------------------------------------------------
# make_pseudo end to end
# ----------------------------------------------------------------------------------------------
def fake_checkpoint(path, class_names, size=64, seed=0):
    """An S checkpoint exactly as the stage scripts write one, with random weights."""
    torch.manual_seed(seed)
    S = network.MaskGenerator("tiny", len(class_names), 8)
    runtime.save_checkpoint({"kind": "mask_generator", "model": S.state_dict(), "num_classes": len(class_names),
                            "class_names": class_names, "args": {"backbone": "tiny", "output_stride": 8,
                                                                 "size": size}, "epoch": 1, "epochs": 1,
                            "done": True}, str(path))
    return str(path)


def mini_world(path, n=10, num_fg=3, seed=0):
    """A small VOC-layout dataset of coloured boxes on noise, images of two sizes."""
    rng = np.random.default_rng(seed)
    ids = [f"m{k:02d}" for k in range(n)]
    root = make_root(path, ids, num_fg, split="train_aug")
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    for k, i in enumerate(ids):
        h, w = (48, 64) if k % 3 else (56, 40)
        image = rng.integers(60, 120, (h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for c in rng.choice(np.arange(1, num_fg + 1), size=1 + k % 2, replace=False):
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[y:y + h // 3, x:x + w // 3] = c
            image[y:y + h // 3, x:x + w // 3] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{i}.jpg"), quality=95)
        datasets.save_mask(os.path.join(root, "SegmentationClass", f"{i}.png"), mask)
    return {"root": root, "num_classes": num_fg, "class_names": datasets.read_class_names(root)}


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    """The shared toy world (tests/conftest.py) if there is one, else a mini world of our own."""
    try:
        return request.getfixturevalue("toy_world")
    except pytest.FixtureLookupError:
        return mini_world(tmp_path_factory.mktemp("mini"))


def test_make_pseudo_end_to_end(world, tmp_path, capsys):
    root = world["root"]
    ckpt = fake_checkpoint(tmp_path / "S.pt", world["class_names"])
    split = "train" if os.path.exists(os.path.join(root, "ImageSets", "Segmentation", "train.txt")) else "train_aug"
    ids = datasets.read_ids(root, split)
    out = tmp_path / "pseudo"
    p = run("make_pseudo.py", "--dataset", "toy", "--data", root, "--checkpoint", ckpt, "--split", split,
            "--out", out, "--device", "cpu", "--workers", 2, "--vis", 2)
    assert p.returncode == 0, p.stderr[-2000:]
    log = open(out / "log.txt").read()
    assert "cams:" in log and "masks:" in log
    labels = datasets.load_labels(root, ids, world["num_classes"], require_nonempty=False)
    for n, i in enumerate(ids):
        with Image.open(out / "masks" / f"{i}.png") as im:
            assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
            mask = np.asarray(im)
        image = datasets.read_image(datasets.image_path(root, i))
        assert mask.shape == image.shape[:2]
        present = (np.flatnonzero(labels[n]) + 1).tolist()
        assert set(np.unique(mask).tolist()) <= {0, *present}
        with np.load(out / "cams" / f"{i}.npz") as z:
            assert z["classes"].tolist() == present and z["cams"].dtype == np.float16
            assert z["cams"].shape == (len(present),) + image.shape[:2]
            if present:
                assert z["cams"].max() <= 1 and z["cams"].min() >= 0
    assert sorted(os.listdir(out / "vis")) == [f"{i}.jpg" for i in ids[:2]]
    for flag, folder in (("--pred", out / "masks"), ("--cams", out / "cams")):
        assert 0 <= last_miou(evaluate(capsys, "--dataset", "toy", "--data", root, "--split", split, flag, folder,
                                       "--workers", 0)) <= 100


def args_for(root, ckpt, out, *extra):
    argv = ["--dataset", "toy", "--data", root, "--checkpoint", ckpt, "--out", str(out), "--device", "cpu",
            "--workers", "0", "--split", "train_aug", *map(str, extra)]
    return runtime.parse_args(make_pseudo.build_parser(), make_pseudo.PRESETS, argv)


def test_batching_storage_and_resume(tmp_path):
    """Batched CAMs equal one-by-one CAMs (mixed image sizes); reduced storage is close; --masks_only
    redoes the masks for a new threshold; CAMs of another checkpoint are not mixed in."""
    w = mini_world(tmp_path / "data", n=8)
    ckpt = fake_checkpoint(tmp_path / "S.pt", w["class_names"], size=48, seed=1)
    make_pseudo.main(args_for(w["root"], ckpt, tmp_path / "b4", "--batch_size", 4, "--cams_only"))
    make_pseudo.main(args_for(w["root"], ckpt, tmp_path / "b1", "--batch_size", 1, "--no-crf"))
    make_pseudo.main(args_for(w["root"], ckpt, tmp_path / "half", "--store_scale", 0.5, "--cams_only"))
    ids = datasets.read_ids(w["root"], "train_aug")
    assert not os.path.exists(tmp_path / "b4" / "masks")
    for i in ids:
        a, ca = load_cams(str(tmp_path / "b4" / "cams" / f"{i}.npz"))
        b, cb = load_cams(str(tmp_path / "b1" / "cams" / f"{i}.npz"))
        c, cc = load_cams(str(tmp_path / "half" / "cams" / f"{i}.npz"))
        assert ca.tolist() == cb.tolist() == cc.tolist() and a.shape == b.shape == c.shape
        assert np.abs(a - b).max() < 2e-3
        assert np.abs(a - c).mean() < 0.05
    mask = {i: datasets.read_mask(str(tmp_path / "b1" / "masks" / f"{i}.png")) for i in ids}
    before = os.path.getmtime(tmp_path / "b1" / "masks" / f"{ids[0]}.png")
    make_pseudo.main(args_for(w["root"], "missing.pt", tmp_path / "b1", "--masks_only", "--no-crf"))
    assert os.path.getmtime(tmp_path / "b1" / "masks" / f"{ids[0]}.png") == before  # same parameters: kept
    make_pseudo.main(args_for(w["root"], "missing.pt", tmp_path / "b1", "--masks_only", "--no-crf",
                              "--bg_threshold", 0.999))
    for i in ids:
        new = datasets.read_mask(str(tmp_path / "b1" / "masks" / f"{i}.png"))
        assert (new > 0).sum() <= (mask[i] > 0).sum() and (new > 0).mean() < 0.05
    assert json.load(open(tmp_path / "b1" / "masks" / "params.json"))["bg_threshold"] == 0.999
    os.remove(tmp_path / "b1" / "cams" / f"{ids[0]}.npz")
    other = fake_checkpoint(tmp_path / "S2.pt", w["class_names"], size=48, seed=2)
    with pytest.raises(ValueError, match="other fingerprint"):
        make_pseudo.main(args_for(w["root"], other, tmp_path / "b1"))
