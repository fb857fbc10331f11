"""CAM network -> stages (a) -> (b) -> (c) on the small toy world: they run as scripts, hand files to each
other, lower their losses, leave CLIP untouched, train what they say, resume exactly, and refuse bad input
clearly."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from semples import datasets, method, network, runtime
import train_cam
import train_match
import train_prompt
import train_refine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "toy", "--device", "cpu", "--workers", "0"]


def run(script, *args, ok=True):
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def epoch_values(log_text, term, phase):
    return [float(m.group(1)) for m in re.finditer(rf"\[{phase}\].* {term} ([-\d.]+)", log_text)]


@pytest.fixture(scope="module")
def stages(toy_world, tmp_path_factory):
    """Run (a) -> (b) -> (c) once as subprocesses, as a user would."""
    out = tmp_path_factory.mktemp("stages")
    data = ["--data", toy_world["root"], "--clip", toy_world["clip"]]
    cam = run("train_cam.py", *FAST, "--data", toy_world["root"], "--out", str(out / "cam"), "--epochs", "3",
              "--batch_size", "16", "--size", "64")
    init = ["--init", str(out / "cam" / "checkpoint.pt"), "--batch_size", "16"]
    a = run("train_match.py", *FAST, *data, *init, "--out", str(out / "match"), "--epochs", "4")
    b = run("train_prompt.py", *FAST, *data, "--match", str(out / "match" / "checkpoint.pt"),
            "--out", str(out / "prompt"), "--epochs", "8", "--prompt_length", "8", "--batch_size", "32")
    c = run("train_refine.py", *FAST, *data, "--init", str(out / "match" / "checkpoint.pt"), "--batch_size", "16",
            "--prompts", str(out / "prompt" / "prompts.pt"), "--out", str(out / "refine"), "--epochs", "2")
    return {"out": out, "logs": (cam.stdout, a.stdout, b.stdout, c.stdout), "data": data, "init": init}


def test_stages_write_what_the_next_reads(stages, toy_world):
    out = stages["out"]
    S, ckpt = network.load_mask_generator(str(out / "refine" / "checkpoint.pt"), "cpu")
    assert ckpt["done"] and ckpt["stage"] == "refine" and ckpt["num_classes"] == toy_world["num_classes"]
    assert ckpt["args"]["size"] == 64 and ckpt["args"]["backbone"] == "tiny"  # the CAM network's, carried on
    prompts = runtime.load_checkpoint(str(out / "prompt" / "prompts.pt"), "prompts")
    assert prompts["prompts"].shape == (toy_world["num_classes"], 8, prompts["prompts"].shape[2])
    assert prompts["class_names"] == toy_world["class_names"]
    for stage in ("cam", "match", "prompt", "refine"):
        assert (out / stage / "log.txt").exists()
        assert json.loads((out / stage / "args.json").read_text())["dataset"] == "toy"


def test_losses_fall(stages):
    cam, a, b, c = stages["logs"]
    cls = epoch_values(cam, "L_cls", "cam")
    assert len(cls) == 3 and cls[-1] < cls[0], cam
    prompt = epoch_values(b, "L_prompt", "prompt")
    assert len(prompt) == 8 and prompt[-1] < prompt[0], b
    match = epoch_values(a, "loss", "match")
    assert len(match) == 4 and all(v == v for v in match)  # finite and logged every epoch
    assert min(match[1:]) < match[0], a
    refine = epoch_values(c, "L_refine", "refine")
    assert len(refine) == 2 and all(v == v for v in refine), c


def small_args(module, toy_world, out, **over):
    argv = FAST + ["--data", toy_world["root"], "--clip", toy_world["clip"], "--out", str(out), "--batch_size", "16"]
    for k, v in over.items():
        argv += [f"--{k}"] + ([] if v is True else [str(v)])  # True: a switch
    return runtime.parse_args(module.build_parser(), module.PRESETS, argv)


def spy_on_clip(module, monkeypatch):
    """Keep the frozen CLIP a stage loads, and a copy of its weights as loaded."""
    seen = {}
    real = module.load_frozen_clip

    def spy(name, device):
        seen["clip"] = real(name, device)
        seen["before"] = {k: v.clone() for k, v in seen["clip"].state_dict().items()}
        return seen["clip"]

    monkeypatch.setattr(module, "load_frozen_clip", spy)
    return seen


@pytest.mark.parametrize("part", ["head", "all"])
def test_clip_frozen_and_only_S_trains(stages, toy_world, tmp_path, monkeypatch, part):
    """--train head changes the 1x1 classifier only (backbone weights and BN statistics untouched);
    --train all changes the backbone too; CLIP never changes."""
    seen = spy_on_clip(train_match, monkeypatch)
    cam = stages["out"] / "cam" / "checkpoint.pt"
    train_match.main(small_args(train_match, toy_world, tmp_path, init=cam, epochs=1, train=part))
    after = seen["clip"].state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)
    assert not any(p.requires_grad for p in seen["clip"].parameters())
    init = torch.load(cam, weights_only=True)["model"]
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    changed = {k for k in final if not torch.equal(init[k], final[k])}
    assert "classifier.weight" in changed
    if part == "head":
        assert changed == {"classifier.weight"}, changed
    else:
        assert any(k.startswith("backbone.") and k.endswith("weight") for k in changed), changed


def test_joint_training_learns_prompts_with_S(stages, toy_world, tmp_path):
    """Table 6's joint run: no prompts file is read; the prompts saved with S moved from their init."""
    train_refine.main(small_args(train_refine, toy_world, tmp_path, init=stages["out"] / "cam" / "checkpoint.pt",
                                 epochs=1, joint=True, prompt_length=4))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.manual_seed(504)
    start = method.Prompts(method.load_frozen_clip(toy_world["clip"], "cpu"), toy_world["num_classes"], 4)
    assert ckpt["extra"]["prompts"].shape == start.prompts.shape
    assert not torch.equal(ckpt["extra"]["prompts"], start.prompts.detach())


def test_only_prompts_train_in_stage_b(stages, toy_world, tmp_path, monkeypatch):
    seen = spy_on_clip(train_prompt, monkeypatch)
    match = stages["out"] / "match" / "checkpoint.pt"
    before_S = torch.load(match, weights_only=True)["model"]
    unlearned = small_args(train_prompt, toy_world, tmp_path / "p0", match=match, epochs=0, prompt_length=4)
    train_prompt.main(unlearned)  # the same seed gives the same initial prompts
    learned = small_args(train_prompt, toy_world, tmp_path / "p2", match=match, epochs=2, prompt_length=4)
    train_prompt.main(learned)
    after = seen["clip"].state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)
    after_S = torch.load(match, weights_only=True)["model"]
    assert all(torch.equal(before_S[k], after_S[k]) for k in after_S)
    p0 = torch.load(tmp_path / "p0" / "prompts.pt", weights_only=True)["prompts"]
    p2 = torch.load(tmp_path / "p2" / "prompts.pt", weights_only=True)["prompts"]
    assert p0.shape == p2.shape and not torch.equal(p0, p2)


def test_stage_b_clips_the_gradient(stages, toy_world, tmp_path):
    """--clip_grad C bounds each step's gradient norm by C, so Adam's second moment (an average of squared
    gradients) sums to at most C^2; without it one epoch goes past that bound."""
    match, c = stages["out"] / "match" / "checkpoint.pt", 1e-5
    assert small_args(train_prompt, toy_world, tmp_path, match=match).clip_grad == 1.0  # the toy preset
    for name, clip_grad in (("clipped", c), ("free", 0)):
        train_prompt.main(small_args(train_prompt, toy_world, tmp_path / name, match=match, epochs=1,
                                     prompt_length=4, clip_grad=clip_grad))

    def second_moment(name):  # Adam's exp_avg_sq, summed over the prompts
        state = torch.load(tmp_path / name / "prompts.pt", weights_only=True)["optimizer"]["state"]
        return sum(float(s["exp_avg_sq"].sum()) for s in state.values())

    v = {name: second_moment(name) for name in ("clipped", "free")}
    assert 0 < v["clipped"] <= c ** 2 < v["free"], v


def test_same_seed_same_cam_network(toy_world, tmp_path):
    """A stage run twice with one seed on CPU gives the same weights (initialisation included)."""
    for name in ("a", "b"):
        train_cam.main(runtime.parse_args(train_cam.build_parser(), train_cam.PRESETS, FAST + [
            "--data", toy_world["root"], "--out", str(tmp_path / name), "--epochs", "1", "--batch_size", "16",
            "--size", "64"]))
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["model"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted(stages, toy_world, tmp_path, monkeypatch):
    cam = stages["out"] / "cam" / "checkpoint.pt"
    full = small_args(train_match, toy_world, tmp_path / "full", init=cam, epochs=2, train="all")
    train_match.main(full)

    real_save = runtime.save_checkpoint
    calls = {"n": 0}

    def killed_after_first_epoch(obj, path):
        real_save(obj, path)
        if str(path).endswith("checkpoint.pt"):
            calls["n"] += 1
            raise KeyboardInterrupt("simulated kill")

    part = small_args(train_match, toy_world, tmp_path / "part", init=cam, epochs=2, train="all")
    monkeypatch.setattr(runtime, "save_checkpoint", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_match.main(part)
    monkeypatch.setattr(runtime, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    changed = small_args(train_match, toy_world, tmp_path / "part", init=cam, epochs=2, train="all", lr=0.1)
    with pytest.raises(ValueError, match="other flags.*--lr"):
        train_match.main(changed)  # resuming with another lr would mix two experiments
    train_match.main(part)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_feature_cache_changes_nothing(stages, toy_world, tmp_path):
    """--cache_features (the toy preset) only skips recomputing the frozen backbone: the weights are those of
    training without it, up to float rounding (the backbone runs on other batches; here they were equal).
    Training without the flips, which is what serving unflipped features would do, moved them by 1e-2."""
    cam = stages["out"] / "cam" / "checkpoint.pt"
    for name, cache in (("on", True), ("off", False)):
        train_match.main(small_args(train_match, toy_world, tmp_path / name, init=cam, epochs=3,
                                    **{"cache_features" if cache else "no-cache_features": True}))
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("on", "off"))
    assert a["args"]["cache_features"] and not b["args"]["cache_features"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-4), k


def test_bad_input_errors(stages, toy_world, tmp_path):
    out = stages["out"]
    data = stages["data"]
    # a missing checkpoint
    p = run("train_prompt.py", *FAST, *data, "--match", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b"),
            ok=False)
    assert p.returncode != 0 and "nope.pt" in p.stderr and "not found" in p.stderr
    # the wrong kind of checkpoint
    p = run("train_prompt.py", *FAST, *data, "--match", str(out / "prompt" / "prompts.pt"),
            "--out", str(tmp_path / "b"), ok=False)
    assert p.returncode != 0 and "expected a 'mask_generator'" in p.stderr
    # a prompts file whose class count does not match the dataset
    bad = torch.load(out / "prompt" / "prompts.pt", weights_only=True)
    bad["prompts"], bad["class_names"], bad["num_classes"] = bad["prompts"][:2], bad["class_names"][:2], 2
    runtime.save_checkpoint(bad, tmp_path / "two.pt")
    p = run("train_refine.py", *FAST, *data, *stages["init"], "--prompts",
            str(tmp_path / "two.pt"), "--out", str(tmp_path / "c"), ok=False)
    assert p.returncode != 0 and "was learned for classes" in p.stderr
    # prompts learned with another CLIP (any weight differs)
    other = tmp_path / "other_clip.pt"
    obj = torch.load(toy_world["clip"], weights_only=True)
    obj["state_dict"]["visual.proj"] = obj["state_dict"]["visual.proj"] * 1.01
    torch.save(obj, other)
    p = run("train_refine.py", *FAST, "--data", toy_world["root"], "--clip", str(other), *stages["init"],
            "--prompts", str(out / "prompt" / "prompts.pt"), "--out", str(tmp_path / "c2"), ok=False)
    assert p.returncode != 0 and "another CLIP" in p.stderr
    # zero or negative epochs, and abbreviated flags, are refused at parse time
    for bad_flag in (["--epochs", "0"], ["--lr", "-1"], ["--epoch", "1"]):
        p = run("train_match.py", *FAST, *data, *stages["init"], "--out", str(tmp_path / "z"), *bad_flag, ok=False)
        assert p.returncode == 2 and bad_flag[0] in p.stderr, p.stderr
    assert not (tmp_path / "z" / "checkpoint.pt").exists()
    # a split list whose masks hold no class at all: nothing to learn from
    root = tmp_path / "data"
    shutil.copytree(toy_world["root"], root)
    first = datasets.read_ids(str(root), "train_aug")[0]
    datasets.save_mask(str(root / "SegmentationClass" / f"{first}.png"), np.zeros((64, 64), np.uint8))
    (root / "ImageSets" / "Segmentation" / "blank.txt").write_text(first + "\n")
    p = run("train_cam.py", *FAST, "--data", str(root), "--split", "blank", "--out", str(tmp_path / "a"), ok=False)
    assert p.returncode != 0 and "no image of split list 'blank'" in p.stderr and "Traceback" not in p.stderr


def test_images_without_a_class_are_left_out(stages, toy_world, tmp_path):
    """Scenery alone (a mask holding no class) gives no (image, class) pair: training leaves such images out and
    says so in its log, instead of stopping (a foreign world may hold some)."""
    root = tmp_path / "data"
    shutil.copytree(toy_world["root"], root)
    ids = datasets.read_ids(str(root), "train_aug")
    for i in ids[:3]:
        datasets.save_mask(str(root / "SegmentationClass" / f"{i}.png"), np.zeros((64, 64), np.uint8))
    note = f"3 of {len(ids)} images of 'train_aug' hold no class in their mask and are left out"
    run("train_cam.py", *FAST, "--data", str(root), "--out", str(tmp_path / "cam"), "--epochs", "1",
        "--batch_size", "16", "--size", "64")
    assert note in (tmp_path / "cam" / "log.txt").read_text()
    run("train_prompt.py", *FAST, "--data", str(root), "--clip", toy_world["clip"], "--match",
        str(stages["out"] / "match" / "checkpoint.pt"), "--out", str(tmp_path / "prompt"), "--epochs", "1",
        "--batch_size", "16")
    assert note in (tmp_path / "prompt" / "log.txt").read_text()
    data = datasets.ClsDataset(str(root), "train_aug", len(datasets.read_class_names(str(root))), 64)
    assert data.ids == ids[3:] and data.labels.any(1).all() and data.left_out == 3
