"""Every training stage under torchrun (2 CPU processes, gloo) on the small toy world: it finishes with a batch
that does not split evenly, and one optimisation step on 2 processes gives the loss and the gradient of one
process on the same global batch (an odd number of images and of (image, class) pairs, so the processes
hold different counts). Refused: more processes than images per batch. The batch split itself is checked
against the 1-process batches for 1, 2 and 3 processes."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from semples import datasets, runtime, train_loop
import one_step
import train_seg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "toy", "--device", "cpu", "--workers", "0"]
TOLERANCE = 1e-5  # gradients and losses, 2 processes against 1 (measured: below 3e-7)
# and relative to the largest gradient entry: the toy's gradients are small (stage b's about 5e-4), so 1e-5
# alone would pass a step without the global-batch weighting (stage b's gradient then differs by 4e-5)
RELATIVE = 1e-3


def torchrun(script, *args, ok=True):
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 SCRIPT ARGS`, as run.sh --gpus 2 does."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if ok:
        assert proc.returncode == 0, f"{script} under torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def pipeline(toy_world, tmp_path_factory):
    """CAM network -> (a) -> (b) -> (c), and the segmenter, each under torchrun with 2 processes on toy train
    (32 images): batches of 7 images (4 + 3 per process) and 9 pairs (5 + 4)."""
    out = tmp_path_factory.mktemp("ddp")
    data = FAST + ["--data", toy_world["root"], "--split", "train", "--epochs", "1"]
    clip = ["--clip", toy_world["clip"]]
    cam = out / "cam" / "checkpoint.pt"
    torchrun("train_cam.py", *data, "--out", out / "cam", "--batch_size", 7, "--size", 64)
    torchrun("train_match.py", *data, *clip, "--init", cam, "--out", out / "match", "--batch_size", 7)
    torchrun("train_prompt.py", *data, *clip, "--match", out / "match" / "checkpoint.pt", "--out", out / "prompt",
             "--batch_size", 9, "--prompt_length", 4)
    torchrun("train_refine.py", *data, *clip, "--init", cam, "--prompts", out / "prompt" / "prompts.pt",
             "--out", out / "refine", "--batch_size", 7)
    torchrun("train_seg.py", *FAST, "--data", toy_world["root"], "--split", "train", "--out", out / "seg",
             "--masks", os.path.join(toy_world["root"], "SegmentationClass"), "--batch_size", 5, "--iters", 3,
             "--crop", 32, "--test_scales", "1.0")
    return out


def test_every_stage_finishes_under_torchrun(pipeline, toy_world):
    for stage, name, kind in [("cam", "checkpoint.pt", "mask_generator"), ("match", "checkpoint.pt", "mask_generator"),
                              ("prompt", "prompts.pt", "prompts"), ("refine", "checkpoint.pt", "mask_generator"),
                              ("seg", "checkpoint.pt", "segmenter")]:
        ckpt = runtime.load_checkpoint(str(pipeline / stage / name), kind)
        assert ckpt["done"], stage
        log = (pipeline / stage / "log.txt").read_text()
        assert "done: " in log and ("iter 3/3 loss" in log if stage == "seg" else f"epoch 1/1 [{stage}]" in log), log
    assert "mIoU: " in (pipeline / "seg" / "log.txt").read_text()  # val predicted by both processes, scored once
    pred = os.listdir(pipeline / "seg" / "pred")
    assert sorted(pred) == sorted(f"{i}.png" for i in datasets.read_ids(toy_world["root"], "val"))


def test_stage_b_takes_S_size_from_stage_a(pipeline):
    """train_prompt.py runs S at stage (a)'s input size (64 here; the toy preset says 96) and records it."""
    args = runtime.load_checkpoint(str(pipeline / "prompt" / "prompts.pt"), "prompts")["args"]
    assert (args["size"], args["backbone"], args["fill"]) == (64, "tiny", "mean")
    assert torch.load(pipeline / "prompt" / "cache.pt", weights_only=True)["key"]["size"] == 64


def test_more_processes_than_images_refused(toy_world, tmp_path):
    p = torchrun("train_seg.py", *FAST, "--data", toy_world["root"], "--out", tmp_path, "--batch_size", 1,
                 "--masks", os.path.join(toy_world["root"], "SegmentationClass"), ok=False)
    assert p.returncode != 0
    assert "train_seg.py: error: --batch_size 1 is smaller than the 2 processes" in p.stderr, p.stderr


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_split_into_the_one_process_batches(world):
    """The processes' shares, put together in rank order, are the 1-process batches (S trainer, segmenter)."""
    batch = 7
    shares = [runtime.rank_share(batch, r, world) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == batch and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1
    for make in (lambda r, w: train_loop.GlobalBatches(30, batch, r, w, seed=3),
                 lambda r, w: train_seg.StepBatches(30, batch, 2, 9, 3, r, w)):
        single = list(make(0, 1))
        per_rank = [list(make(r, world)) for r in range(world)]
        assert all(len(b) == len(single) for b in per_rank)
        assert [sum((b[i] for b in per_rank), []) for i in range(len(single))] == single
    with pytest.raises(ValueError, match="--batch_size 2 is smaller than the 3 processes"):
        runtime.rank_share(2, 0, 3)


# ---------------- one step on 2 processes == one step on 1 ----------------
@pytest.fixture(scope="module")
def seven(toy_world, tmp_path_factory):
    """A split of 7 images, 5 with one class and 2 with two: 9 (image, class) pairs. Split over 2 processes
    as 4 + 3 images, the processes hold 4 + m and 5 - m pairs (m two-class images in the first), never equal."""
    root = tmp_path_factory.mktemp("seven")
    for name in ("JPEGImages", "SegmentationClass", "class_names.txt"):
        os.symlink(os.path.join(toy_world["root"], name), root / name)
    ids = datasets.read_ids(toy_world["root"], "train")
    classes = datasets.load_labels(toy_world["root"], ids, toy_world["num_classes"]).sum(1)
    pick = [i for i, c in zip(ids, classes) if c == 1][:5] + [i for i, c in zip(ids, classes) if c == 2][:2]
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "seven.txt").write_text("\n".join(pick) + "\n")
    return str(root)


def one_step_both_ways(script, flags, tmp_path):
    """The first step of `script` in this process and under torchrun with 2 processes."""
    single = one_step.run(script, [*map(str, flags), "--out", str(tmp_path / "one")])
    torchrun(os.path.join("tests", "one_step.py"), tmp_path / "two.pt", script, *flags, "--out", tmp_path / "two")
    return single, torch.load(tmp_path / "two.pt", weights_only=True)


def assert_same_step(single, double, what):
    assert single["grads"] is not None and len(single["grads"]) == len(double["grads"])
    assert [g is None for g in single["grads"]] == [g is None for g in double["grads"]]
    grad_diff = max((a - b).abs().max().item() for a, b in zip(single["grads"], double["grads"]) if a is not None)
    grad_max = max(g.abs().max().item() for g in single["grads"] if g is not None)
    assert len(single["logged"]) == len(double["logged"]) > 0
    loss_diff = float(np.max(np.abs(np.subtract(single["logged"], double["logged"]))))
    print(f"{what}: max |grad 1 - grad 2| = {grad_diff:.2e} (max |grad| {grad_max:.2e}), "
          f"max |loss 1 - loss 2| = {loss_diff:.2e}")
    assert loss_diff <= TOLERANCE, (single["logged"], double["logged"])
    assert grad_diff <= TOLERANCE and grad_diff <= RELATIVE * grad_max, (grad_diff, grad_max)


def test_one_step_stage_a(pipeline, seven, toy_world, tmp_path):
    """Stage (a) through semples/train_loop.py: L_match (a mean over pairs), 7 images = one step."""
    flags = FAST + ["--data", seven, "--split", "seven", "--clip", toy_world["clip"], "--batch_size", 7,
                    "--epochs", 1, "--init", pipeline / "cam" / "checkpoint.pt"]
    assert_same_step(*one_step_both_ways("train_match.py", flags, tmp_path), "stage (a)")


def test_one_step_stage_b(pipeline, seven, toy_world, tmp_path):
    """Stage (b): L_prompt over 9 pairs = one step (5 + 4 pairs per process)."""
    flags = FAST + ["--data", seven, "--split", "seven", "--clip", toy_world["clip"], "--batch_size", 9,
                    "--epochs", 1, "--prompt_length", 4, "--match", pipeline / "match" / "checkpoint.pt"]
    assert_same_step(*one_step_both_ways("train_prompt.py", flags, tmp_path), "stage (b)")


def test_one_step_segmenter(seven, tmp_path):
    """The segmenter: cross-entropy, a mean over the labelled pixels of 7 random crops (their counts differ:
    crops of images scaled below the crop size are padded with ignored pixels). Frozen BatchNorm, as with
    ImageNet weights (per-process batch statistics would differ from the global batch's on CPU)."""
    flags = FAST + ["--data", seven, "--split", "seven", "--masks", os.path.join(seven, "SegmentationClass"),
                    "--batch_size", 7, "--iters", 1, "--crop", 48, "--freeze_bn", "--eval_split", "seven",
                    "--test_scales", "1.0"]
    assert_same_step(*one_step_both_ways("train_seg.py", flags, tmp_path), "segmenter")


def test_one_step_stage_c_joint(pipeline, seven, toy_world, tmp_path):
    """Stage (c) with --joint: S and the prompts (outside DDP's module, averaged by the trainer) in one step."""
    flags = FAST + ["--data", seven, "--split", "seven", "--clip", toy_world["clip"], "--batch_size", 7,
                    "--epochs", 1, "--init", pipeline / "cam" / "checkpoint.pt", "--joint", "--prompt_length", 4]
    single, double = one_step_both_ways("train_refine.py", flags, tmp_path)
    assert len(single["grads"]) == 2  # S's classifier and the prompts
    assert_same_step(single, double, "stage (c) joint")


def test_deit_cam_network_under_torchrun_and_one_step_stage_a(seven, toy_world, tmp_path):
    """WeakTr's DeiT-S as S (at 64 px: a 4 x 4 grid): its CAM network trains under DDP (the final norm, never
    applied, takes no gradient), and one step of stage (a) (head and fusion on the fixed transformer) on 2
    processes is one process's step."""
    cam = tmp_path / "cam"
    torchrun("train_cam.py", *FAST, "--data", seven, "--split", "seven", "--epochs", 1, "--backbone", "deit_s",
             "--size", 64, "--batch_size", 7, "--augment", "flip", "--out", cam)
    assert runtime.load_checkpoint(str(cam / "checkpoint.pt"), "mask_generator")["done"]
    flags = FAST + ["--data", seven, "--split", "seven", "--clip", toy_world["clip"], "--batch_size", 7,
                    "--epochs", 1, "--init", cam / "checkpoint.pt"]
    single, double = one_step_both_ways("train_match.py", flags, tmp_path)
    assert len(single["grads"]) == 8  # the 3x3 head (weight, bias), the fusion (2 layers with bias, 2 without)
    assert_same_step(single, double, "stage (a), deit_s")
