"""CAM files in the authors' release / WeakTr format ({id}.npy: np.save of {0-based class index: H x W map}) next
to ours ({id}.npz), both ways: eval_miou.py's sweep and make_pseudo.py's masks are the same from either,
make_pseudo.py writes them (--cam_format npy) and reads them back, a malformed file is refused naming it; and
make_pseudo.py --shard I/N: the shards together write exactly the files of one unsharded run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import eval_miou
import make_pseudo
from semples import datasets, presets, runtime
from semples.cams import load_cams, save_cams
from test_pseudo_eval import fake_checkpoint, make_root, mini_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_release(path, cam_dict):
    """A CAM file exactly as the release / WeakTr writes one: np.save(path, cam_dict)."""
    np.save(path, cam_dict)


def release_dict(cams, classes, numpy_keys=False):
    """Our (cams [C_present, H, W], 1-based classes) as the release's cam_dict: 0-based keys (np.int64 keys, as
    `np.where(label)[0]` gives them, where numpy_keys), float32 maps."""
    keys = [np.int64(c - 1) if numpy_keys else int(c - 1) for c in classes]
    return {k: np.asarray(m, np.float32) for k, m in zip(keys, cams)}


def minmax(cam):
    """The release's per-class normalisation."""
    return (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)


def sweep(capsys, data, folder, tmp_path, *extra):
    """eval_miou.py --cams in this process; returns its JSON."""
    out = tmp_path / f"sweep_{os.path.basename(folder)}.json"
    capsys.readouterr()
    eval_miou.main(runtime.parse_args(eval_miou.build_parser(), eval_miou.PRESETS, [
        "--dataset", "toy", "--data", str(data), "--cams", str(folder), "--workers", "0", "--json", str(out),
        "--t_start", "0.05", "--t_end", "0.95", *map(str, extra)]))
    return json.loads(out.read_text())


def weaktr_miou(gt_maps, cam_dicts, threshold, C):
    """WeakTr's evaluation as its code does it: a [K+1, H, W] stack with tensor[k+1] = cam_dict[k] and tensor[0]
    = the threshold, argmax, one confusion over the set; the mIoU (fraction)."""
    conf = np.zeros((C, C), np.int64)
    for gt, cam_dict in zip(gt_maps, cam_dicts):
        stack = np.zeros((C,) + gt.shape)
        for k, m in cam_dict.items():
            stack[k + 1] = m
        stack[0] = threshold
        pred = stack.argmax(0)
        ok = gt != 255
        conf += np.bincount(gt[ok].astype(np.int64) * C + pred[ok], minlength=C * C).reshape(C, C)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    return float((tp[denom > 0] / denom[denom > 0]).mean())


def test_eval_sweep_on_release_files_equals_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    K, ids = 4, [f"i{n}" for n in range(6)]
    data = make_root(tmp_path / "data", ids, K)
    ours, release = tmp_path / "npz", tmp_path / "npy"
    gts, dicts = [], []
    for n, i in enumerate(ids):
        h, w = (20, 30) if n % 2 else (24, 18)
        classes = sorted(rng.choice(np.arange(1, K + 1), size=1 + n % 3, replace=False).tolist())
        gt = np.zeros((h, w), np.uint8)
        cams = []
        for c in classes:
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            gt[y:y + h // 2, x:x + w // 2] = c
            cam = rng.random((h, w)) * 0.6
            cam[y:y + h // 2, x:x + w // 2] += 0.5
            cams.append(minmax(cam))
        gt[0, :] = 255  # an ignored band
        datasets.save_mask(os.path.join(data, "SegmentationClass", f"{i}.png"), gt)
        cams = np.stack(cams).astype(np.float16).astype(np.float32)  # values both formats hold exactly
        save_cams(str(ours / f"{i}.npz"), cams, classes, (h, w))
        os.makedirs(release, exist_ok=True)
        d = release_dict(cams, classes, numpy_keys=n % 2 == 1)
        save_release(str(release / f"{i}.npy"), d)
        gts.append(gt)
        dicts.append(d)
    a, b = sweep(capsys, data, ours, tmp_path), sweep(capsys, data, release, tmp_path)
    assert b["miou_per_threshold"] == a["miou_per_threshold"] and b["best_threshold"] == a["best_threshold"]
    assert b["confusion"] == a["confusion"] and b["miou"] == a["miou"]
    for t in (0.2, 0.43, a["best_threshold"]):  # WeakTr's own evaluation of the .npy files agrees
        k = a["thresholds"].index(t)
        assert abs(weaktr_miou(gts, dicts, t, K + 1) * 100 - b["miou_per_threshold"][k]) < 1e-9
    # a folder with both formats for every image: --cam_format says which
    for i in ids:
        os.link(ours / f"{i}.npz", release / f"{i}.npz")
    with pytest.raises(ValueError, match="both .npz and .npy"):
        sweep(capsys, data, release, tmp_path)
    assert sweep(capsys, data, release, tmp_path, "--cam_format", "npy")["confusion"] == a["confusion"]
    os.remove(release / f"{ids[0]}.npy")
    with pytest.raises(FileNotFoundError, match=f"{ids[0]}.npy"):
        sweep(capsys, data, release, tmp_path, "--cam_format", "npy")


def pseudo_args(root, out, *extra, checkpoint="none.pt", split="train_aug"):
    argv = ["--dataset", "toy", "--data", root, "--checkpoint", checkpoint, "--out", str(out), "--device", "cpu",
            "--workers", "0", "--split", split, *map(str, extra)]
    return runtime.parse_args(make_pseudo.build_parser(), make_pseudo.PRESETS, argv)


def masks_of(folder, ids):
    return {i: datasets.read_mask(str(folder / f"{i}.png")) for i in ids}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A mini world, a random S and its CAMs and masks in our format (OUT/cams/*.npz, OUT/masks)."""
    tmp = tmp_path_factory.mktemp("release")
    w = mini_world(tmp / "data", n=7)
    ckpt = fake_checkpoint(tmp / "S.pt", w["class_names"], size=48, seed=1)
    make_pseudo.main(pseudo_args(w["root"], tmp / "npz", checkpoint=ckpt))
    return {**w, "ckpt": ckpt, "out": tmp / "npz", "ids": datasets.read_ids(w["root"], "train_aug")}


def test_make_pseudo_reads_release_files_like_npz(made, tmp_path, capsys):
    """Our CAMs rewritten as the release's files: --cams DIR gives the masks of the npz, CRF and all, at the same
    threshold (given: files without our record are the release's, WeakTr's DeiT CAMs, whose threshold the
    default is then)."""
    folder = tmp_path / "release"
    folder.mkdir()
    for n, i in enumerate(made["ids"]):
        cams, classes = load_cams(str(made["out"] / "cams" / f"{i}.npz"))
        save_release(str(folder / f"{i}.npy"), release_dict(cams, classes.tolist(), numpy_keys=n % 2 == 0))
    make_pseudo.main(pseudo_args(made["root"], tmp_path / "default", "--cams", folder))
    assert "--bg_threshold 0.43, the preset of a deit_s S on toy" in capsys.readouterr().out
    threshold = ["--bg_threshold", presets.bg_threshold("toy", "tiny")]  # the S that made the npz
    make_pseudo.main(pseudo_args(made["root"], tmp_path / "out", "--cams", folder, *threshold))
    want = masks_of(made["out"] / "masks", made["ids"])
    got = masks_of(tmp_path / "out" / "masks", made["ids"])
    assert all((got[i] == want[i]).all() for i in made["ids"])
    assert not (tmp_path / "out" / "cams").exists()  # read from --cams, nothing computed
    # the same threshold again: kept; a touched file: its mask is redone
    first = tmp_path / "out" / "masks" / f"{made['ids'][0]}.png"
    before = os.path.getmtime(first)
    make_pseudo.main(pseudo_args(made["root"], tmp_path / "out", "--cams", folder, *threshold))
    assert os.path.getmtime(first) == before
    os.utime(folder / f"{made['ids'][0]}.npy", (1, 1))
    make_pseudo.main(pseudo_args(made["root"], tmp_path / "out", "--cams", folder, *threshold))
    assert os.path.getmtime(first) != before


def test_make_pseudo_writes_release_files_and_reads_them_back(made, tmp_path, capsys):
    out = tmp_path / "npy"
    make_pseudo.main(pseudo_args(made["root"], out, "--cam_format", "npy", checkpoint=made["ckpt"]))
    labels = datasets.load_labels(made["root"], made["ids"], made["num_classes"], require_nonempty=False)
    for n, i in enumerate(made["ids"]):
        d = np.load(out / "cams" / f"{i}.npy", allow_pickle=True).item()  # as the release's readers load it
        assert isinstance(d, dict) and sorted(d) == np.flatnonzero(labels[n]).tolist()
        image = datasets.read_image(datasets.image_path(made["root"], i))
        ours, classes = load_cams(str(made["out"] / "cams" / f"{i}.npz"))
        for k, c in zip(classes - 1, ours):
            assert type(k.item()) is int and d[int(k)].dtype == np.float32 and d[int(k)].shape == image.shape[:2]
            assert (d[int(k)] == c).all() and 0 <= d[int(k)].min() and d[int(k)].max() <= 1
    assert not list((out / "cams").glob("*.npz"))
    want = masks_of(made["out"] / "masks", made["ids"])
    assert all((masks_of(out / "masks", made["ids"])[i] == want[i]).all() for i in made["ids"])
    a = sweep(capsys, made["root"], made["out"] / "cams", tmp_path, "--split", "train_aug")
    b = sweep(capsys, made["root"], out / "cams", tmp_path, "--split", "train_aug")
    assert a["confusion"] == b["confusion"] and a["best_threshold"] == b["best_threshold"]
    # --masks_only reads them back (the format found in the folder); a rerun keeps them
    stamp = {i: os.path.getmtime(out / "cams" / f"{i}.npy") for i in made["ids"]}
    make_pseudo.main(pseudo_args(made["root"], out, "--masks_only", "--mask_dir", out / "again"))
    assert all((masks_of(out / "again", made["ids"])[i] == want[i]).all() for i in made["ids"])
    make_pseudo.main(pseudo_args(made["root"], out, "--cam_format", "npy", checkpoint=made["ckpt"]))
    assert {i: os.path.getmtime(out / "cams" / f"{i}.npy") for i in made["ids"]} == stamp
    # the files of another S are not reused, nor written into a release's folder (no cam_meta.json)
    other = fake_checkpoint(tmp_path / "S2.pt", made["class_names"], size=48, seed=2)
    with pytest.raises(ValueError, match="cam_meta.json differs"):
        make_pseudo.main(pseudo_args(made["root"], out, "--cam_format", "npy", checkpoint=other))
    os.remove(out / "cams" / "cam_meta.json")
    with pytest.raises(ValueError, match="no cam_meta.json"):
        make_pseudo.main(pseudo_args(made["root"], out, "--cam_format", "npy", checkpoint=made["ckpt"]))
    with pytest.raises(ValueError, match="--store_scale 1"):
        make_pseudo.main(pseudo_args(made["root"], tmp_path / "half", "--cam_format", "npy", "--store_scale", 0.5,
                                     checkpoint=made["ckpt"]))


@pytest.mark.parametrize("case", ["not a dict", "string key", "negative key", "key out of range",
                                  "shape mismatch", "maps of two sizes"])
def test_malformed_release_file_is_refused_naming_it(made, tmp_path, capsys, case):
    folder = tmp_path / "release"
    folder.mkdir()
    for i in made["ids"]:
        cams, classes = load_cams(str(made["out"] / "cams" / f"{i}.npz"))
        save_release(str(folder / f"{i}.npy"), release_dict(cams, classes.tolist()))
    bad = folder / f"{made['ids'][1]}.npy"
    d = np.load(bad, allow_pickle=True).item()
    k, m = next(iter(d.items()))
    K = made["num_classes"]
    save_release(str(bad), {
        "not a dict": np.stack(list(d.values())),
        "string key": {"cam": m},
        "negative key": {-1: m},
        "key out of range": {K: m},  # class value K + 1
        "shape mismatch": {k: m[:, :-1]},
        "maps of two sizes": {k: m, k + 1 if k + 1 < K else k - 1: m[:-1]},
    }[case])
    with pytest.raises(ValueError) as e:
        make_pseudo.main(pseudo_args(made["root"], tmp_path / "out", "--cams", folder))
    assert str(bad) in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        sweep(capsys, made["root"], folder, tmp_path, "--split", "train_aug")
    assert str(bad) in str(e.value), str(e.value)


def read_tree(folder):
    """{relative path: content} of a make_pseudo output folder, the contents decoded (an npz's zip holds times)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.suffix == ".npz":
            with np.load(path) as z:
                files[rel] = {k: z[k].tolist() for k in z.files}
        elif path.suffix == ".png":
            files[rel] = (datasets.read_mask(str(path)).tolist(), datasets.mask_key(str(path)))
        elif path.is_file():
            files[rel] = path.read_bytes()
    return files


def test_two_shards_write_the_files_of_one_run(made, tmp_path):
    assert len(made["ids"]) == 7  # shards of 4 and 3
    make_pseudo.main(pseudo_args(made["root"], tmp_path / "one", "--vis", 3, checkpoint=made["ckpt"]))
    cmd = [sys.executable, os.path.join(ROOT, "make_pseudo.py"), "--dataset", "toy", "--data", made["root"],
           "--checkpoint", made["ckpt"], "--out", str(tmp_path / "two"), "--device", "cpu", "--workers", "0",
           "--split", "train_aug", "--vis", "3"]
    procs = [subprocess.Popen(cmd + ["--shard", f"{s}/2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in (0, 1)]  # at once, into one OUT
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    for sub in ("cams", "masks", "vis"):
        assert read_tree(tmp_path / "two" / sub) == read_tree(tmp_path / "one" / sub), sub
    log = (tmp_path / "two" / "log.txt").read_text().splitlines()
    assert all(" [shard 0/2] " in line or " [shard 1/2] " in line for line in log)
    assert sum("[shard 0/2] cams: 4 computed" in line for line in log) == 1
    assert sum("[shard 1/2] cams: 3 computed" in line for line in log) == 1
    for s in (0, 1):
        assert json.loads((tmp_path / "two" / "shards" / f"{s}of2" / "args.json").read_text())["shard"] == [s, 2]
    bad = subprocess.run(cmd + ["--shard", "2/2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--shard" in bad.stderr and "0 <= I < N" in bad.stderr
