"""train_seg.py (DeepLab-v2 on pseudo or ground-truth masks) on the small toy world: the architecture is
DeepLab-v2's, it runs as a script and writes what eval_miou.py scores, it learns (far above trivial
predictors), it resumes exactly, and it refuses bad input clearly.
Oracles: eval_miou.py's CLI and semples/metrics.py, torchvision's ResNet, trivial constant predictors."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from semples import datasets, metrics, runtime
import eval_miou
import train_seg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and fast on 2 CPU cores; the toy world's images are 64 px.
FAST = ["--dataset", "toy", "--device", "cpu", "--workers", "0", "--crop", "48", "--batch_size", "8"]
LEARN_ITERS = 150


def args_for(toy_world, out, *extra, masks=None):
    argv = FAST + ["--data", toy_world["root"], "--out", str(out),
                   "--masks", masks or os.path.join(toy_world["root"], "SegmentationClass"), *map(str, extra)]
    return runtime.parse_args(train_seg.build_parser(), train_seg.PRESETS, argv)


@pytest.fixture(scope="module")
def trained(toy_world, tmp_path_factory):
    """One run as a user would: a subprocess trained on the ground-truth masks, predicting val."""
    out = tmp_path_factory.mktemp("seg")
    argv = FAST + ["--data", toy_world["root"], "--out", str(out), "--iters", str(LEARN_ITERS),
                   "--masks", os.path.join(toy_world["root"], "SegmentationClass")]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_seg.py"), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train_seg.py failed:\n{proc.stdout}\n{proc.stderr}"
    return {"out": out, "stdout": proc.stdout}


def test_deeplab_v2_architecture():
    net = train_seg.DeepLabV2("resnet101", 21, 8, (6, 12, 18, 24), freeze_bn=True)
    assert [(c.kernel_size, c.dilation, c.padding, c.out_channels) for c in net.aspp] == \
        [((3, 3), (r, r), (r, r), 21) for r in (6, 12, 18, 24)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.aspp.modules())
    assert net.backbone[7][0].conv2.dilation == (4, 4) and net.backbone[6][5].conv2.dilation == (2, 2)
    net.train()  # frozen BN stays in eval mode with fixed affine parameters
    bns = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training and not m.weight.requires_grad for m in bns)
    with torch.no_grad():
        assert net(torch.rand(1, 3, 65, 81)).shape == (1, 21, 9, 11)  # output stride 8


def test_imagenet_init(tmp_path):
    """--init takes a torchvision state dict (fc dropped) and fills the backbone with it."""
    ref = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = train_seg.DeepLabV2("resnet18", 5, 8)
    train_seg.load_imagenet(net, str(path), "resnet18")
    assert torch.equal(net.backbone[0].weight, ref.conv1.weight)
    assert torch.equal(net.backbone[7][1].conv2.weight, ref.layer4[1].conv2.weight)
    with pytest.raises(ValueError, match="does not fit --backbone"):
        train_seg.load_imagenet(train_seg.DeepLabV2("resnet34", 5, 8), str(path), "resnet34")


def test_augmentation_deterministic_and_padded(toy_world):
    masks = os.path.join(toy_world["root"], "SegmentationClass")
    data = train_seg.SegDataset(toy_world["root"], "train_aug", masks, toy_world["num_classes"] + 1, 96,
                                (0.5, 0.5), seed=1)
    x1, y1 = data[(3, 7)]
    x2, y2 = data[(3, 7)]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (3, 96, 96) and y1.shape == (96, 96)
    # a 64 px image at scale 0.5 is 32 px: the rest of the 96 px crop is mean-padded and ignored
    assert (y1 == 255).float().mean() > 0.8
    pad = (y1 == 255) & (x1 - torch.tensor(train_seg.IMAGENET_MEAN).view(3, 1, 1)).abs().amax(0).lt(1e-6)
    assert pad.float().mean() > 0.8
    data.crop, data.scales = 48, (0.5, 1.5)  # other iterations draw other scales, crops and flips
    masks = {tuple(data[(3, step)][1].flatten().tolist()) for step in range(4)}
    assert len(masks) == 4


def test_end_to_end_writes_palette_predictions(trained, toy_world):
    out, stdout = trained["out"], trained["stdout"]
    ids = datasets.read_ids(toy_world["root"], "val")
    for i in ids:
        with Image.open(out / "pred" / f"{i}.png") as im:
            assert im.mode == "P" and im.size == (64, 64)
            assert np.asarray(im).max() <= toy_world["num_classes"]
    assert re.search(r"^mIoU: \d+\.\d\d$", stdout, re.M), stdout
    log = (out / "log.txt").read_text()
    logged = [int(n) for n in re.findall(r"iter (\d+)/\d+ loss", log)]  # every LOG_EVERY iterations and the last
    assert "mIoU:" in log and logged == sorted(set(range(train_seg.LOG_EVERY, LEARN_ITERS + 1, train_seg.LOG_EVERY))
                                               | {LEARN_ITERS})
    ckpt = runtime.load_checkpoint(str(out / "checkpoint.pt"), "segmenter")
    assert ckpt["done"] and ckpt["iter"] == LEARN_ITERS and ckpt["num_classes"] == toy_world["num_classes"]
    # eval_miou.py's CLI scores the written PNGs to the figure train_seg printed
    res = eval_miou.main(runtime.parse_args(eval_miou.build_parser(), eval_miou.PRESETS, [
        "--dataset", "toy", "--data", toy_world["root"], "--split", "val", "--pred", str(out / "pred"),
        "--workers", "0"]))
    assert f"mIoU: {res['miou']:.2f}" in stdout


def test_learns_far_above_trivial(trained, toy_world):
    """On ground-truth masks the segmenter must beat the best constant predictor by a wide margin."""
    root, K1 = toy_world["root"], toy_world["num_classes"] + 1
    gts = [datasets.read_mask(os.path.join(root, "SegmentationClass", f"{i}.png"))
           for i in datasets.read_ids(root, "val")]
    trivial = max(100 * metrics.miou_from_confusion(
        sum(metrics.confusion_matrix(g, np.full_like(g, c), K1) for g in gts))[0] for c in range(K1))
    miou = float(re.search(r"^mIoU: ([\d.]+)$", trained["stdout"], re.M).group(1))
    assert miou >= 2 * trivial and miou >= trivial + 15, f"mIoU {miou:.2f} vs trivial {trivial:.2f}"


@pytest.mark.smoke
def test_resume_is_exact(toy_world, tmp_path):
    """Stopped at iteration 3 of 6 and continued == one run of 6 iterations (weights and momentum)."""
    common_flags = ["--iters", 6, "--crop", 32, "--batch_size", 4, "--eval_split", "train"]
    train_seg.main(args_for(toy_world, tmp_path / "a", *common_flags, "--stop_after", 3))
    half = runtime.load_checkpoint(str(tmp_path / "a" / "checkpoint.pt"), "segmenter")
    assert half["iter"] == 3 and not half["done"]
    assert not (tmp_path / "a" / "pred").exists()
    train_seg.main(args_for(toy_world, tmp_path / "a", *common_flags))
    train_seg.main(args_for(toy_world, tmp_path / "b", *common_flags))
    a = runtime.load_checkpoint(str(tmp_path / "a" / "checkpoint.pt"), "segmenter")
    b = runtime.load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"), "segmenter")
    assert a["done"] and b["done"] and a["iter"] == b["iter"] == 6
    for k in b["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    assert not torch.equal(half["model"]["aspp.0.weight"], b["model"]["aspp.0.weight"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.allclose(sa["momentum_buffer"], sb["momentum_buffer"], atol=1e-6)
    assert "resumed from" in (tmp_path / "a" / "log.txt").read_text()

    # --checkpoint alone predicts with a finished segmenter; a checkpoint for another class count is refused
    train_seg.main(args_for(toy_world, tmp_path / "b", "--checkpoint", tmp_path / "b" / "checkpoint.pt",
                            "--eval_split", "val", "--crf", "--workers", 0))
    assert all((tmp_path / "b" / "pred" / f"{i}.png").exists() for i in datasets.read_ids(toy_world["root"], "val"))
    wrong = dict(b, num_classes=b["num_classes"] + 2, class_names=b["class_names"] + ["x", "y"])
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"trained for \d+ foreground classes"):
        train_seg.main(args_for(toy_world, tmp_path / "c", "--checkpoint", tmp_path / "wrong.pt"))
    torch.save(dict(b, kind="mask_generator"), tmp_path / "kind.pt")
    with pytest.raises(ValueError, match="expected a 'segmenter' checkpoint"):
        train_seg.main(args_for(toy_world, tmp_path / "c", "--checkpoint", tmp_path / "kind.pt"))


def test_bad_masks_are_refused(toy_world, tmp_path):
    root = toy_world["root"]
    with pytest.raises(FileNotFoundError, match="--masks folder .*nowhere not found"):
        train_seg.main(args_for(toy_world, tmp_path / "o1", masks=str(tmp_path / "nowhere")))
    masks = tmp_path / "masks"
    shutil.copytree(os.path.join(root, "SegmentationClass"), masks)
    ids = datasets.read_ids(root, "train_aug")
    os.remove(masks / f"{ids[5]}.png")
    with pytest.raises(FileNotFoundError, match=re.escape(str(masks / f"{ids[5]}.png"))):
        train_seg.main(args_for(toy_world, tmp_path / "o2", masks=str(masks)))
    bad = datasets.read_mask(os.path.join(root, "SegmentationClass", f"{ids[5]}.png")).copy()
    bad[0, 0] = toy_world["num_classes"] + 1
    datasets.save_mask(str(masks / f"{ids[5]}.png"), bad)
    data = train_seg.SegDataset(root, "train_aug", str(masks), toy_world["num_classes"] + 1, 32, (1, 1), 0)
    with pytest.raises(ValueError, match=re.escape(f"{ids[5]}.png holds class {toy_world['num_classes'] + 1}")):
        data[(5, 0)]
