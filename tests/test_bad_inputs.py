"""Bad input gets a clear error naming the flag or file, never a traceback from deep inside: one table of
(script, argv, message fragment) per kind of bad input, run in this process (a subprocess costs seconds of
imports), plus the reliability rules behind them: labels follow the masks and nothing is written into
the dataset, CAM reuse is keyed per file, resume refuses changed flags, presets show in --help and their
paths do not depend on the working directory."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from semples import datasets, network, runtime
import eval_miou
import make_pseudo
from tools import compare_clusters, report
import train_cam
import train_match
import train_prompt
import train_refine
import train_seg

SCRIPTS = {"train_cam": train_cam, "train_match": train_match, "train_prompt": train_prompt,
           "train_refine": train_refine, "make_pseudo": make_pseudo, "train_seg": train_seg, "eval_miou": eval_miou,
           "compare_clusters": compare_clusters, "report": report}
CPU = ["--dataset", "toy", "--device", "cpu", "--workers", "0"]


def stage(name, argv):
    module = SCRIPTS[name]
    return module.main(runtime.parse_args(module.build_parser(), module.PRESETS, [str(a) for a in argv]))


def error_of(name, argv, capsys):
    """Run a stage that must fail; returns argparse's message (exit 2) or the exception's."""
    capsys.readouterr()
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as e:
        stage(name, argv)
    if isinstance(e.value, SystemExit):
        assert e.value.code == 2
        return capsys.readouterr().err
    return str(e.value)


def fake_S(path, class_names, seed, epoch=1, epochs=1):
    """A mask generator checkpoint as train_cam.py writes one, random weights (unfinished if epoch < epochs)."""
    torch.manual_seed(seed)
    S = network.MaskGenerator("tiny", len(class_names), 8)
    runtime.save_checkpoint({"kind": "mask_generator", "model": S.state_dict(), "num_classes": len(class_names),
                            "class_names": class_names, "args": {"backbone": "tiny", "output_stride": 8, "size": 64},
                            "epoch": epoch, "epochs": epochs, "done": epoch == epochs}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def w(toy_world, tmp_path_factory):
    """The toy world, a random S on it, a text file, a truncated CLIP and a regular file to put --out under."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "text.pt").write_text("not a checkpoint\n")
    (tmp / "truncated.pt").write_bytes(open(toy_world["clip"], "rb").read()[:50000])
    (tmp / "afile").write_text("x")
    (tmp / "nowords.txt").write_text("# a comment, no words\n\n")
    names = toy_world["class_names"]
    for bad, clusters in {"unknown": {"a": names + ["unicorn"]}, "twice": {"a": names, "b": names[:1]},
                          "missing": {"a": names[1:]}}.items():
        (tmp / f"{bad}.json").write_text(json.dumps(clusters))
    (tmp / "notjson.json").write_text("{vehicles: boat}")
    clip_file = torch.load(toy_world["clip"], weights_only=True)
    sd = clip_file["state_dict"]
    for name, change in {"clip_missing": lambda d: d.pop("transformer.resblocks.0.ln_1.weight"),
                         "clip_extra": lambda d: d.update({"head.weight": torch.zeros(3)}),
                         "clip_shape": lambda d: d.update({"ln_final.bias": torch.zeros(7)}),
                         "clip_nan": lambda d: d.update({"logit_scale": torch.tensor(float("nan"))})}.items():
        edited = dict(sd)
        change(edited)
        torch.save(dict(clip_file, state_dict=edited), tmp / f"{name}.pt")
    # what a killed stage leaves: a checkpoint saved after an epoch (or iteration) short of the last
    torch.save({"kind": "prompts", "epoch": 3, "epochs": 30, "done": False}, tmp / "prompts_part.pt")
    torch.save({"kind": "segmenter", "iter": 5, "iters": 10, "done": False}, tmp / "seg_part.pt")
    return dict(toy_world, tmp=tmp, S=fake_S(tmp / "S.pt", toy_world["class_names"], 0),
                S_part=fake_S(tmp / "S_part.pt", toy_world["class_names"], 0, epoch=2, epochs=5),
                gt=os.path.join(toy_world["root"], "SegmentationClass"))


def fill(argv, w):
    return [str(a).format(**{k: v for k, v in w.items() if isinstance(v, (str, os.PathLike))}) for a in argv]


TRAIN = CPU + ["--data", "{root}", "--out", "{tmp}/o", "--size", 32, "--batch_size", 16]
MATCH = CPU + ["--data", "{root}", "--out", "{tmp}/o", "--init", "{S}", "--batch_size", 16]
PROMPT = CPU + ["--data", "{root}", "--out", "{tmp}/o"]
UNFINISHED = ["unfinished", "rerun the stage"]
CASES = [  # (kind, script, argv, fragments the message must hold)
    ("epochs 0", "train_cam", TRAIN + ["--epochs", 0], ["--epochs", "positive"]),
    ("epochs negative", "train_match", MATCH + ["--epochs", -2], ["--epochs", "positive"]),
    ("lr negative", "train_match", MATCH + ["--lr", -1], ["--lr", "positive"]),
    ("batch larger than the pairs", "train_prompt", PROMPT + ["--match", "{S}", "--clip", "{clip}", "--batch_size",
                                                              100000], ["--batch_size 100000", "pairs", "lower it"]),
    ("batch_size 0", "train_prompt", CPU + ["--data", "{root}", "--batch_size", 0], ["--batch_size"]),
    ("abbreviated flag", "train_match", MATCH + ["--epoch", 1], ["unrecognized", "--epoch"]),
    ("iters 0", "train_seg", CPU + ["--data", "{root}", "--iters", 0], ["--iters", "positive"]),
    ("bg_threshold 1.5", "make_pseudo", CPU + ["--data", "{root}", "--bg_threshold", 1.5], ["--bg_threshold"]),
    ("scales not numbers", "make_pseudo", CPU + ["--data", "{root}", "--checkpoint", "{S}", "--scales", "1,abc"],
     ["--scales", "1,abc"]),
    ("unknown device", "train_cam", TRAIN + ["--device", "gpu"], ["--device", "'gpu'", "cpu, cuda"]),
    ("t_start above t_end", "eval_miou", ["--dataset", "toy", "--data", "{root}", "--cams", "{tmp}",
                                          "--t_start", 0.9, "--t_end", 0.1], ["--t_start 0.9", "--t_end 0.1"]),
    ("missing --data folder", "train_cam", CPU + ["--data", "{tmp}/nowhere", "--out", "{tmp}/o"],
     ["--data folder", "nowhere", "does not exist"]),
    ("text file as --clip", "train_match", MATCH + ["--clip", "{tmp}/text.pt"],
     ["--clip", "text.pt", "not a readable"]),
    ("truncated --clip", "train_refine", MATCH + ["--clip", "{tmp}/truncated.pt", "--joint"],
     ["--clip", "truncated.pt", "not a readable CLIP checkpoint"]),
    ("--out under a file", "train_cam", TRAIN + ["--out", "{tmp}/afile/run"],
     ["--out", "afile/run", "Not a directory"]),
    ("--mask_dir under a file", "make_pseudo", CPU + ["--data", "{root}", "--out", "{tmp}/p", "--masks_only",
                                                      "--mask_dir", "{tmp}/afile/m"], ["--mask_dir", "afile/m"]),
    ("cluster file: unknown class", "train_cam", TRAIN + ["--clusters", "{tmp}/unknown.json"],
     ["--clusters", "unknown.json", "'unicorn'", "not a class"]),
    ("cluster file: class in two clusters", "train_cam", TRAIN + ["--clusters", "{tmp}/twice.json"],
     ["--clusters", "twice.json", "in two clusters", "'a' and 'b'"]),
    ("cluster file: missing class", "train_cam", TRAIN + ["--clusters", "{tmp}/missing.json"],
     ["--clusters", "missing.json", "in no cluster"]),
    ("cluster file: not JSON", "train_cam", TRAIN + ["--clusters", "{tmp}/notjson.json"],
     ["--clusters", "notjson.json", "not valid JSON"]),
    ("cluster file: absent", "train_cam", TRAIN + ["--clusters", "{tmp}/nowhere.json"],
     ["--clusters", "nowhere.json", "cannot read"]),
    ("word list: absent", "train_prompt", PROMPT + ["--words", "{tmp}/nowhere.txt"],
     ["--words", "nowhere.txt", "cannot read"]),
    ("word list: no words", "train_prompt", PROMPT + ["--words", "{tmp}/nowords.txt"],
     ["--words", "nowords.txt", "holds no words"]),
    ("report of no run", "report", ["--dataset", "toy", "--data", "{root}", "--out", "{tmp}/norun", "--device", "cpu"],
     ["norun/results.json not found", "run bash run.sh first"]),
    ("segmenter: frozen BatchNorm of random weights", "train_seg", CPU + ["--data", "{root}", "--masks", "{gt}",
                                                                           "--backbone", "resnet101", "--freeze_bn"],
     ["--freeze_bn", "ImageNet weights", "--init", "--no-freeze_bn"]),
    ("CLIP file: a key missing", "train_match", MATCH + ["--clip", "{tmp}/clip_missing.pt"],
     ["--clip", "clip_missing.pt", "missing keys", "resblocks.0.ln_1.weight"]),
    ("CLIP file: an extra key", "train_match", MATCH + ["--clip", "{tmp}/clip_extra.pt"],
     ["--clip", "clip_extra.pt", "unexpected keys", "head.weight"]),
    ("CLIP file: a weight of another shape", "train_match", MATCH + ["--clip", "{tmp}/clip_shape.pt"],
     ["--clip", "clip_shape.pt", "'ln_final.bias' has shape (7,)"]),
    ("CLIP file: NaN weights", "train_refine", MATCH + ["--clip", "{tmp}/clip_nan.pt", "--joint"],
     ["--clip", "clip_nan.pt", "NaN", "logit_scale", "another CLIP file"]),
    ("unfinished CAM network as --init", "train_match", MATCH + ["--init", "{S_part}"],
     ["--init", "S_part.pt", "epoch 2/5"] + UNFINISHED),
    ("unfinished stage (a) as --match", "train_prompt", PROMPT + ["--match", "{S_part}"],
     ["--match", "S_part.pt", "epoch 2/5"] + UNFINISHED),
    ("unfinished S as --checkpoint", "make_pseudo", CPU + ["--data", "{root}", "--out", "{tmp}/p", "--checkpoint",
                                                         "{S_part}"], ["--checkpoint", "S_part.pt"] + UNFINISHED),
    ("unfinished prompts", "train_refine", MATCH + ["--clip", "{clip}", "--prompts", "{tmp}/prompts_part.pt"],
     ["--prompts", "prompts_part.pt", "epoch 3/30"] + UNFINISHED),
    ("unfinished segmenter as --checkpoint", "train_seg", CPU + ["--data", "{root}", "--out", "{tmp}/s",
                                                                  "--checkpoint", "{tmp}/seg_part.pt"],
     ["--checkpoint", "seg_part.pt", "iteration 5/10"] + UNFINISHED),
    ("--json under a file", "eval_miou", ["--dataset", "toy", "--data", "{root}", "--pred", "{gt}", "--json",
                                          "{tmp}/afile/r.json"], ["--json", "afile is a file"]),
]


@pytest.mark.parametrize("kind,script,argv,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(kind, script, argv, fragments, w, capsys):
    msg = error_of(script, fill(argv, w), capsys)
    for f in fragments:
        assert f in msg, f"{kind}: {f!r} not in {msg!r}"
    assert "Traceback" not in msg and "class_names.txt" not in msg


@pytest.mark.parametrize("world", [1, 2], ids=["single", "torchrun"])
def test_cuda_asked_for_but_not_there(world, w, capsys, monkeypatch):
    """--device cuda without a CUDA device, or (under torchrun) with fewer GPUs than local ranks."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(gpus if world > 1 else 0))
    device = "cuda" if world > 1 else f"cuda:{gpus}"
    msg = error_of("train_cam", fill(TRAIN + ["--device", device, "--epochs", 1], w), capsys)
    assert f"--device {device}" in msg and "visible" in msg, msg


def test_run_from_another_folder(w, tmp_path, monkeypatch):
    """Preset paths are the repository's, the toy CLIP is DATA's, and a missing --data folder says so
    (as a script run from elsewhere: exit 1 and one error line, no traceback)."""
    monkeypatch.chdir(tmp_path)
    args = runtime.parse_args(train_match.build_parser(), train_match.PRESETS, ["--dataset", "toy", "--data", w["root"]])
    assert args.clip == os.path.join(w["root"], "tiny_clip.pt")
    assert args.out == os.path.join(runtime.REPO, "out", "toy", "match")
    assert runtime.parse_args(train_cam.build_parser(), train_cam.PRESETS, ["--dataset", "toy"]).data == \
        os.path.join(runtime.REPO, "data", "toy")
    p = subprocess.run([sys.executable, os.path.join(runtime.REPO, "train_cam.py"), "--dataset", "toy", "--device",
                        "cpu", "--data", "nowhere"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "train_cam.py: error: --data folder nowhere does not exist" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "class_names.txt" not in p.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_lists_every_preset(script, capsys):
    module = SCRIPTS[script]
    for dataset in ("voc", "toy"):
        with pytest.raises(SystemExit) as e:
            runtime.parse_args(module.build_parser(), module.PRESETS, ["--dataset", dataset, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        epilog = " ".join(text.split("presets (")[1].split())
        flags = {a.dest for a in module.build_parser()._actions}
        for name, values in module.PRESETS.items():
            assert f" {name}: " in epilog
            for k, v in values.items():
                if k in flags:
                    assert f"--{k} {v}" in epilog, (name, k)
        lr = module.PRESETS[dataset].get("lr")
        if lr is not None:  # `--dataset toy --help` shows toy's value as the default
            assert f"(default: {lr})" in " ".join(text.split())


def snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files} | {"": os.stat(root).st_mtime_ns}


def test_labels_follow_the_masks_and_nothing_is_written_into_the_dataset(w, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(w["root"], root, ignore=shutil.ignore_patterns("tiny_clip.pt", "cls_labels.json"))
    ids, K = datasets.read_ids(str(root), "train"), w["num_classes"]
    before = datasets.load_labels(str(root), ids, K)
    mask_path = root / "SegmentationClass" / f"{ids[0]}.png"
    other = [k for k in range(1, K + 1) if not before[0, k - 1]][0]
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = other
    datasets.save_mask(str(mask_path), mask)
    after = datasets.load_labels(str(root), ids, K)
    assert np.flatnonzero(after[0]).tolist() == [other - 1] and (after[1:] == before[1:]).all()
    # a read-only dataset: a stage reads it and writes nothing into it (root ignores the mode bits,
    # so the snapshot is what tells)
    files = snapshot(root)
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o555)
    try:
        stage("train_cam", CPU + ["--data", root, "--split", "train", "--out", tmp_path / "cam", "--epochs", 1,
                                  "--size", 32, "--batch_size", 16])
    finally:
        for d, _, _ in os.walk(root):
            os.chmod(d, 0o755)
    assert snapshot(root) == files
    assert (tmp_path / "cam" / "checkpoint.pt").exists()


def test_cam_reuse_is_keyed_per_file(w, tmp_path, capsys):
    """Split A with S_x, split B with S_y, then A with S_y: the CAMs of S_x are not reused."""
    X, Y = w["S"], fake_S(tmp_path / "Y.pt", w["class_names"], 1)
    base = CPU + ["--data", w["root"], "--out", tmp_path / "p", "--cams_only"]
    stage("make_pseudo", base + ["--split", "train", "--checkpoint", X])
    stage("make_pseudo", base + ["--split", "val", "--checkpoint", Y])
    stage("make_pseudo", base + ["--split", "val", "--checkpoint", Y])  # the same key: reused
    msg = error_of("make_pseudo", base + ["--split", "train", "--checkpoint", Y], capsys)
    first = datasets.read_ids(w["root"], "train")[0]
    assert "other fingerprint" in msg and f"{first}.npz" in msg and "S.pt" in msg, msg
    msg = error_of("make_pseudo", base + ["--split", "val", "--checkpoint", Y, "--scales", "1.0"], capsys)
    assert "other scales" in msg, msg


def test_cam_reuse_is_keyed_on_the_image(w, tmp_path, capsys):
    """A CAM file is not reused for an image file replaced since, nor for another --data's image of that name."""
    root = tmp_path / "world"
    shutil.copytree(w["root"], root, ignore=shutil.ignore_patterns("tiny_clip.pt"))
    base = CPU + ["--data", root, "--split", "train", "--out", tmp_path / "p", "--cams_only", "--checkpoint", w["S"]]
    stage("make_pseudo", base)
    stage("make_pseudo", base)  # unchanged: reused
    first = datasets.read_ids(str(root), "train")[0]
    os.utime(root / "JPEGImages" / f"{first}.jpg", ns=(1, 1))  # as a copy of another photo under the same name
    msg = error_of("make_pseudo", base, capsys)
    assert "other image" in msg and f"{first}.npz" in msg, msg
    other = tmp_path / "other"  # another data set whose files bear the same names (written at another time)
    shutil.copytree(w["root"], other, copy_function=shutil.copy, ignore=shutil.ignore_patterns("tiny_clip.pt"))
    msg = error_of("make_pseudo", CPU + ["--data", other, "--split", "train", "--out", tmp_path / "p",
                                         "--cams_only", "--checkpoint", w["S"]], capsys)
    assert "other image" in msg, msg


def test_train_seg_resume_refuses_changed_flags(w, tmp_path, capsys):
    run = CPU + ["--data", w["root"], "--masks", w["gt"], "--out", tmp_path / "s", "--iters", 4, "--crop", 32,
                 "--batch_size", 4, "--eval_split", "train"]
    stage("train_seg", run + ["--stop_after", 1])
    msg = error_of("train_seg", run + ["--lr", 0.1], capsys)
    assert "other flags" in msg and "--lr" in msg, msg
    stage("train_seg", run + ["--lr", 0.1, "--no-resume", "--stop_after", 1])  # afresh: the old state goes
    log = (tmp_path / "s" / "log.txt").read_text()
    assert "--no-resume: removed the old" in log
    assert torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)["args"]["lr"] == 0.1


def test_voc_settings_with_the_tiny_clip(w, tmp_path):
    """The paper's VOC flags with the toy CLIP (64 px input, context 40): S's CAMs are resized to the
    CLIP's input resolution, so no size mismatch arises."""
    stage("train_match", ["--dataset", "voc", "--device", "cpu", "--workers", 0, "--data", w["root"], "--clip",
                          w["clip"], "--init", w["S"], "--out", tmp_path / "a", "--epochs", 1, "--batch_size", 16])
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["done"]


def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    """torch.save on a full disk fails with "unexpected pos" (CI saw it); the error must name the file and the
    cause, and the half-written temporary file must go. A failed write on a disk with room keeps its own error."""
    path = tmp_path / "ckpt" / "checkpoint.pt"

    def full_disk_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"\0" * 3 * 2**20)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 72224064 vs 72223960")

    monkeypatch.setattr(torch, "save", full_disk_save)
    Usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(OSError, match=r"could not write .*checkpoint\.pt: its disk is full \(1 MiB free with 3 MiB"):
        runtime.save_checkpoint({"w": torch.zeros(3)}, str(path))
    assert os.listdir(path.parent) == []

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 2**30, 9 * 2**30))
    with pytest.raises(RuntimeError, match="unexpected pos") as e:
        runtime.save_checkpoint({"w": torch.zeros(3)}, str(path))
    assert not isinstance(e.value, OSError) and os.listdir(path.parent) == []

    # A stage's command line ends on it with one line naming the file, like any bad input.
    def main(args):
        runtime.save_checkpoint({"w": torch.zeros(3)}, str(path))

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 10 * 2**30, 0))
    monkeypatch.setattr(sys, "argv", ["stage.py"])
    parser = runtime.new_parser("a stage")
    with pytest.raises(SystemExit) as e:
        runtime.run_cli(main, parser, {"voc": {}})
    assert e.value.code == 1
    assert "stage.py: error: [Errno 28] could not write" in capsys.readouterr().err


def test_a_background_line_in_class_names_is_not_a_class(tmp_path):
    """VOC-style lists (labelme's, imgviz's) begin with the background; mask index k is still class k."""
    for first in ("_background_", "background", "__Background__"):
        (tmp_path / "class_names.txt").write_text(f"{first}\nboat\ncamel\n")
        assert datasets.read_class_names(str(tmp_path)) == ["boat", "camel"]
    (tmp_path / "class_names.txt").write_text("boat\nbackground\n")  # only a first line is the background's
    assert datasets.read_class_names(str(tmp_path)) == ["boat", "background"]


def test_masks_are_read_as_class_indices_or_refused(tmp_path):
    """Palette, grey and 16-bit grey PNGs hold the same indices; RGB colours and indices past 255 are refused,
    naming the file."""
    from PIL import Image
    m = np.array([[0, 1, 2], [3, 255, 0]], np.uint8)
    for name, im in [("p", Image.fromarray(m, "L").convert("P")), ("l", Image.fromarray(m)),
                     ("i16", Image.fromarray(m.astype(np.uint16)))]:
        im.save(tmp_path / f"{name}.png")
        got = datasets.read_mask(str(tmp_path / f"{name}.png"))
        assert got.dtype == np.uint8 and (got == m).all(), name
    Image.fromarray(np.full((2, 3), 300, np.uint16)).save(tmp_path / "big.png")
    Image.fromarray(np.stack([m] * 3, -1)).save(tmp_path / "rgb.png")
    for name, fragment in [("big", "0..255"), ("rgb", "has mode RGB")]:
        with pytest.raises(ValueError, match=fragment) as e:
            datasets.read_mask(str(tmp_path / f"{name}.png"))
        assert f"{name}.png" in str(e.value)


def test_one_run_per_out_folder_and_leftovers_go(w, tmp_path):
    """A run holds its --out folder: a second run into it is refused naming the folder and the first run's pid;
    a lock whose run is gone is taken over, and the temporary files a killed run left (a half-written checkpoint)
    are removed by the next run into the folder."""
    out = tmp_path / "cam"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from semples import runtime\nwith runtime.hold_folder(sys.argv[2]):\n"
                               "    print('held', flush=True); time.sleep(120)", runtime.REPO, str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cmd = [sys.executable, os.path.join(runtime.REPO, "train_cam.py"), *CPU, "--data", w["root"], "--out", str(out),
               "--epochs", 1, "--size", 32, "--batch_size", 16]
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and f"--out {out} is in use by another run (pid {holder.pid})" in p.stderr, p.stderr
    finally:
        holder.kill()
        holder.wait()
    assert (out / runtime.LOCK).exists()  # killed: its lock stays, naming a process that is gone
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"\0" * 1000)  # what a kill -9 in a checkpoint write leaves
    (out / "sub").mkdir()
    (out / "sub" / ".masks.png.ab.tmp").write_bytes(b"\0")
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint.pt", "log.txt", "sub"] and not os.listdir(out / "sub")


TOOL_CASES = [  # (kind, tool, argv, fragments): every tool's flags are checked when parsed, as the stages' are
    ("make_toy: probability above 1", "make_toy", ["--cooccur", "1.5"], ["--cooccur", "[0, 1]"]),
    ("make_toy: no images", "make_toy", ["--n_train", "0"], ["--n_train", "positive"]),
    ("make_toy: negative seed", "make_toy", ["--seed", "-1"], ["--seed", ">= 0"]),
    ("ablate: negative seed", "ablate", ["--seeds", "0", "-3"], ["--seeds", ">= 0"]),
    ("ablate: unknown device", "ablate", ["--device", "gpu"], ["--device", "'gpu'"]),
    ("seeds: no world", "seeds", ["--worlds", "-1"], ["--worlds", ">= 0"]),
    ("bench: zero steps", "bench", ["--steps", "0"], ["--steps", "positive"]),
]


@pytest.mark.parametrize("kind,tool,argv,fragments", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_bad_tool_flag_is_a_clear_error(kind, tool, argv, fragments):
    p = subprocess.run([sys.executable, os.path.join(runtime.REPO, "tools", f"{tool}.py"), *argv], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    for f in fragments:
        assert f in p.stderr, f"{kind}: {f!r} not in {p.stderr!r}"


def test_make_toy_never_writes_into_a_dataset(w, tmp_path):
    """make_toy --out pointed at a folder that is not a toy world (a user's VOC-layout dataset) is refused before
    anything is written into it."""
    voc = tmp_path / "VOC2012"
    shutil.copytree(os.path.join(w["root"], "JPEGImages"), voc / "JPEGImages")
    before = snapshot(str(voc))
    p = subprocess.run([sys.executable, os.path.join(runtime.REPO, "tools", "make_toy.py"), "--out", str(voc)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and f"--out {voc} holds files but no toy_meta.json" in p.stderr, p.stderr
    assert snapshot(str(voc)) == before


@pytest.mark.parametrize("lines,fragment", [
    (["boat", "camel", "Boat"], "names the class 'Boat' twice (classes 1 and 3)"), (["_background_"], "names no class")])
def test_class_names_file_is_checked(tmp_path, lines, fragment):
    (tmp_path / "class_names.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"class_names.txt") as e:
        datasets.read_class_names(str(tmp_path))
    assert fragment in str(e.value), str(e.value)


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) is read upright, so it
    lines up with the mask drawn on the upright view; a grey or palette image comes out RGB."""
    from PIL import Image
    upright = np.zeros((40, 30, 3), np.uint8)  # H 40, W 30, a red square at the top-left
    upright[:10, :10] = (255, 0, 0)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 30 x 40, as the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    got = datasets.read_image(str(tmp_path / "photo.jpg"))
    assert got.shape == (40, 30, 3)
    assert got[:8, :8, 0].min() > 200 and got[:8, :8, 1].max() < 60  # the red corner is back at the top-left
    Image.fromarray(upright[..., 0]).save(tmp_path / "grey.png")
    assert datasets.read_image(str(tmp_path / "grey.png")).shape == (40, 30, 3)


def test_errors_from_worker_processes_and_diverged_training_are_one_line(w, tmp_path):
    """A truncated JPEG read in a DataLoader worker (--workers 1) ends as the same one line as with --workers 0, not
    the worker's wrapped traceback; a loss that diverges (--lr 1e9) is one line advising a lower --lr."""
    root = tmp_path / "world"
    shutil.copytree(w["root"], root, ignore=shutil.ignore_patterns("tiny_clip.pt"))
    first = datasets.read_ids(str(root), "train")[0]
    jpg = root / "JPEGImages" / f"{first}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    base = [sys.executable, os.path.join(runtime.REPO, "train_cam.py"), "--dataset", "toy", "--device", "cpu",
            "--data", str(root), "--split", "train", "--epochs", "1", "--size", "32", "--batch_size", "8"]
    lines = {}
    for workers in ("0", "1"):
        p = subprocess.run(base + ["--workers", workers, "--out", str(tmp_path / f"w{workers}")], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 1, p.stderr
        lines[workers] = p.stderr.strip().splitlines()
    assert lines["1"] == lines["0"] and len(lines["0"]) == 1, lines
    assert f"cannot read image {jpg}" in lines["0"][0]
    p = subprocess.run(base[:6] + ["--data", w["root"], "--split", "train", "--epochs", "3", "--size", "32",
                                   "--batch_size", "8", "--workers", "0", "--lr", "1e9", "--out", str(tmp_path / "lr")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "train_cam.py: error: loss is" in p.stderr and "lower --lr" in p.stderr, p.stderr


@pytest.mark.parametrize("change", ["relabelled mask", "replaced image", "shorter list"])
def test_resume_refuses_other_data(w, tmp_path, capsys, change):
    """A run rerun into its --out after its data changed (same flags, same names) starts afresh only when told to:
    resuming would continue training on other data."""
    root = tmp_path / "world"
    shutil.copytree(w["root"], root, ignore=shutil.ignore_patterns("tiny_clip.pt"))
    run = CPU + ["--data", root, "--split", "train", "--out", tmp_path / "cam", "--epochs", 1, "--size", 32,
                 "--batch_size", 8]
    stage("train_cam", run)
    ids = datasets.read_ids(str(root), "train")
    if change == "relabelled mask":
        mask = datasets.read_mask(str(root / "SegmentationClass" / f"{ids[0]}.png"))
        datasets.save_mask(str(root / "SegmentationClass" / f"{ids[0]}.png"), np.where(mask == 0, 0, 1))
    elif change == "replaced image":
        os.utime(root / "JPEGImages" / f"{ids[0]}.jpg", ns=(1, 1))
    else:
        (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[1:]) + "\n")
    msg = error_of("train_cam", run, capsys)
    assert "trained on other data" in msg and "--no-resume" in msg, msg
    stage("train_cam", run + ["--no-resume"])
