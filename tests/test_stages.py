"""Stages (a) -> (b) -> (c) on the small toy world: they run as scripts, hand files to each other,
lower their losses, leave CLIP untouched, resume exactly, and refuse bad input clearly."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import common
import semples
import train_match
import train_prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "toy", "--device", "cpu", "--workers", "0", "--batch_size", "16", "--size", "64"]


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
    a = run("train_match.py", *FAST, *data, "--out", str(out / "match"), "--cls_epochs", "3", "--epochs", "4")
    b = run("train_prompt.py", *FAST, *data, "--match", str(out / "match" / "checkpoint.pt"),
            "--out", str(out / "prompt"), "--epochs", "8", "--prompt_length", "8")
    c = run("train_refine.py", *FAST, *data, "--init", str(out / "match" / "init.pt"),
            "--prompts", str(out / "prompt" / "prompts.pt"), "--out", str(out / "refine"), "--epochs", "2")
    return {"out": out, "logs": (a.stdout, b.stdout, c.stdout), "data": data}


def test_stages_write_what_the_next_reads(stages, toy_world):
    out = stages["out"]
    S, ckpt = semples.load_mask_generator(str(out / "refine" / "checkpoint.pt"), "cpu")
    assert ckpt["done"] and ckpt["stage"] == "refine" and ckpt["num_classes"] == toy_world["num_classes"]
    prompts = common.load_checkpoint(str(out / "prompt" / "prompts.pt"), "prompts")
    assert prompts["prompts"].shape == (toy_world["num_classes"], 8, prompts["prompts"].shape[2])
    assert prompts["class_names"] == toy_world["class_names"]
    for stage in ("match", "prompt", "refine"):
        assert (out / stage / "log.txt").exists()
        assert json.loads((out / stage / "args.json").read_text())["dataset"] == "toy"


def test_losses_fall(stages):
    a, b, _ = stages["logs"]
    cls = epoch_values(a, "L_cls", "cls-warmup")
    assert cls[-1] < cls[0], a
    prompt = epoch_values(b, "L_prompt", "prompt")
    assert len(prompt) == 8 and prompt[-1] < prompt[0], b
    match = epoch_values(a, "L_match", "match")
    assert len(match) == 4 and all(v == v for v in match)  # finite and logged every epoch
    assert min(match[1:]) < match[0], a


def small_args(module, toy_world, out, **over):
    argv = FAST + ["--data", toy_world["root"], "--clip", toy_world["clip"], "--out", str(out)]
    for k, v in over.items():
        argv += [f"--{k}", str(v)]
    return common.parse_args(module.build_parser(), module.PRESETS, argv)


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


def test_clip_frozen_and_only_S_trains(toy_world, tmp_path, monkeypatch):
    seen = spy_on_clip(train_match, monkeypatch)
    args = small_args(train_match, toy_world, tmp_path, cls_epochs=0, epochs=1)
    train_match.train(args)
    after = seen["clip"].state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)
    assert not any(p.requires_grad for p in seen["clip"].parameters())
    init = torch.load(tmp_path / "init.pt", weights_only=True)["model"]
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.equal(init[k], final[k]) for k in final if k.endswith("weight"))


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


def test_resume_equals_uninterrupted(toy_world, tmp_path, monkeypatch):
    full = small_args(train_match, toy_world, tmp_path / "full", cls_epochs=1, epochs=1)
    train_match.train(full)

    real_save = common.save_checkpoint
    calls = {"n": 0}

    def killed_after_first_epoch(obj, path):
        real_save(obj, path)
        if str(path).endswith("checkpoint.pt"):
            calls["n"] += 1
            raise KeyboardInterrupt("simulated kill")

    part = small_args(train_match, toy_world, tmp_path / "part", cls_epochs=1, epochs=1)
    monkeypatch.setattr(common, "save_checkpoint", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_match.train(part)
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    train_match.train(part)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


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
    common.save_checkpoint(bad, tmp_path / "two.pt")
    p = run("train_refine.py", *FAST, *data, "--init", str(out / "match" / "init.pt"), "--prompts",
            str(tmp_path / "two.pt"), "--out", str(tmp_path / "c"), ok=False)
    assert p.returncode != 0 and "2 classes" in p.stderr
    # an empty label row
    root = tmp_path / "data"
    shutil.copytree(toy_world["root"], root)
    labels = json.loads((root / "cls_labels.json").read_text())
    first = common.read_ids(str(root), "train_aug")[0]
    labels[first] = []
    (root / "cls_labels.json").write_text(json.dumps(labels))
    p = run("train_match.py", *FAST, "--data", str(root), "--clip", toy_world["clip"], "--out",
            str(tmp_path / "a"), ok=False)
    assert p.returncode != 0 and "empty label row" in p.stderr and first in p.stderr
