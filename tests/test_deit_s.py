"""WeakTr's DeiT as S through the pipeline (semples/network.py's DeiTMaskGenerator; the network itself is
tests/test_deit.py's): train_cam.py --backbone deit_s takes the ImageNet file unchanged and WeakTr's recipe as its
presets; the stages make masks from the fine CAM the release's way and train only the head and the fusion;
make_pseudo.py sees each image at its own size and thresholds at WeakTr's value; a WeakTr CAM checkpoint starts
stage (a). The toy stages run the small twin, deit_toy, on the toy world."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import make_pseudo
import train_cam
import train_match
import train_prompt
import train_refine
from semples import datasets, deit, network, presets, runtime, train_loop
from semples.method import masked_pairs

FAST = ["--dataset", "toy", "--device", "cpu", "--workers", "0"]


def _imagenet_deit_file(path, seed=0):
    """A DeiT-S file as the DeiT authors ship it: {'model': timm's deit_small_patch16_224 state dict} (1 class
    token, 1000-way head), random weights (timm: the test oracle)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in timm.create_model("deit_small_patch16_224").state_dict().items()}
    torch.save({"model": sd}, path)
    return sd


def _parse(module, argv):
    return runtime.parse_args(module.build_parser(), module.PRESETS, argv)


# ----------------------------------------------------------------------------------------------
# train_cam.py --backbone deit_s: the ImageNet file, the recipe
# ----------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_imagenet_file_given_to_train_cam_lands_in_S_unchanged(tmp_path, monkeypatch, toy_world):
    """What train_cam.py hands the trainer: every transformer tensor of the file, unchanged, but the class token
    and its position, repeated per class; the 1000-way head dropped."""
    path = tmp_path / "deit_small_patch16_224-cd65a155.pth"
    sd = _imagenet_deit_file(path)
    seen = {}
    monkeypatch.setattr(train_loop, "train", lambda args, objective, stage, S=None, **kw: seen.update(S=S, kw=kw))
    train_cam.main(_parse(train_cam, FAST + ["--data", toy_world["root"], "--backbone", "deit_s", "--init", str(path),
                                               "--out", str(tmp_path / "cam")]))
    S, K = seen["S"], toy_world["num_classes"]
    assert isinstance(S, network.DeiTMaskGenerator) and seen["kw"] == {"outputs": {"logits": True}}
    got = S.net.state_dict()
    for k, v in sd.items():
        if k.startswith("head."):
            continue
        if k == "cls_token":
            assert torch.equal(got[k], v.repeat(1, K, 1)), k
        elif k == "pos_embed":
            assert torch.equal(got[k][:, :K], v[:, :1].repeat(1, K, 1)) and torch.equal(got[k][:, K:], v[:, 1:]), k
        else:
            assert torch.equal(got[k], v), k
    assert got["head.weight"].shape == (K, 384, 3, 3)


@pytest.mark.smoke
def test_deit_presets_are_weaktr_recipe():
    voc = _parse(train_cam, ["--dataset", "voc", "--backbone", "deit_s"])
    assert (voc.optimizer, voc.lr, voc.weight_decay, voc.epochs, voc.batch_size, voc.size, voc.warmup_epochs,
            voc.min_lr, voc.augment, voc.head_lr_mult) == ("adamw", 6e-4, 0.03, 60, 64, 224, 5, 1e-5, "deit", 1.0)
    assert _parse(train_cam, ["--dataset", "coco", "--backbone", "deit_s"]).lr == 2e-4
    assert _parse(train_cam, ["--dataset", "voc", "--backbone", "deit_s", "--lr", "1e-3"]).lr == 1e-3  # flag wins
    resnet = _parse(train_cam, ["--dataset", "voc"])  # IRN's recipe stays the ResNet's
    assert (resnet.optimizer, resnet.lr, resnet.size, resnet.augment) == ("sgd", 0.1, 448, "flip")
    toy = _parse(train_cam, ["--dataset", "toy", "--backbone", "deit_toy"])
    assert toy.backbone == "deit_toy" and toy.out.endswith(os.path.join("out", "toy_deit", "cam"))
    assert presets.bg_threshold("voc", "deit_s") == 0.43 and presets.bg_threshold("coco", "deit_s") == 0.42
    assert presets.bg_threshold("voc", "resnet50") == 0.15
    with pytest.raises(ValueError, match="--clusters works with the ResNet"):
        network.build_mask_generator("deit_toy", 4, 16, clusters=[[0, 1], [2, 3]])


@pytest.mark.smoke
def test_deit_augmentation_is_seeded_per_image(toy_world):
    """DeiT's crops, RandAugment and erasing draw from (seed, epoch, index): the same sample twice is the same
    image (resume, any worker), another epoch another one; values stay in [0, 1]."""
    data = datasets.ClsDataset(toy_world["root"], "train", toy_world["num_classes"], 48, augment="deit", seed=3)
    a, b = data[5][0], data[5][0]
    assert torch.equal(a, b) and a.shape == (3, 48, 48) and 0 <= a.min() and a.max() <= 1
    data.epoch = 1
    assert not torch.equal(data[5][0], a)


# ----------------------------------------------------------------------------------------------
# Masks from the fine CAM, the release's way
# ----------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_deit_masks_align_corners_and_eps_by_hand():
    """Stage (a)/(c) masks of a DeiT S: the fine CAM resized with align_corners=True, min-max with eps 0.1; stage (b)
    with eps 1e-4; a ResNet S's as before (align_corners=False, eps 1e-5)."""
    torch.manual_seed(0)
    cams = torch.rand(1, 2, 3, 3) * 0.3
    x, y = torch.rand(1, 3, 8, 8), torch.tensor([[0.0, 1.0]])
    for backbone, stage, corners, eps in (("deit_s", "match", True, 0.1), ("deit_toy", "refine", True, 0.1),
                                          ("deit_s", "prompt", True, 1e-4), ("resnet50", "match", False, 1e-5)):
        style = network.mask_style(backbone, stage)
        assert style == {"align_corners": corners, "eps": eps}
        M = masked_pairs(x, cams, y, 8, **style)[4]
        up = F.interpolate(cams[:, 1:2], size=(8, 8), mode="bilinear", align_corners=corners)
        assert torch.allclose(M, (up - up.min()) / (up.max() - up.min() + eps), atol=1e-6)
    # corners: the resized map's corner pixels are the CAM's corner cells exactly only with align_corners=True
    up = F.interpolate(cams[:, 1:2], size=(8, 8), mode="bilinear", align_corners=True)
    assert up[0, 0, 0, 0] == cams[0, 1, 0, 0] and up[0, 0, -1, -1] == cams[0, 1, -1, -1]


# ----------------------------------------------------------------------------------------------
# The stages with deit_toy on the toy world
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deit_pipeline(toy_world, tmp_path_factory):
    """CAM network (deit_toy, 1 epoch) -> (a) -> (b) -> (c) -> CAMs and pseudo masks of toy train."""
    out = tmp_path_factory.mktemp("deit")
    data = FAST + ["--data", toy_world["root"], "--split", "train", "--epochs", "1", "--batch_size", "8"]
    clip = ["--clip", toy_world["clip"]]
    train_cam.main(_parse(train_cam, data + ["--backbone", "deit_toy", "--size", "64", "--out", str(out / "cam")]))
    train_match.main(_parse(train_match, data + clip + ["--init", str(out / "cam" / "checkpoint.pt"),
                                                        "--out", str(out / "match")]))
    train_prompt.main(_parse(train_prompt, FAST + ["--data", toy_world["root"], "--split", "train", "--epochs", "1",
                                                   "--batch_size", "8", *clip, "--prompt_length", "4",
                                                   "--match", str(out / "match" / "checkpoint.pt"),
                                                   "--out", str(out / "prompt")]))
    train_refine.main(_parse(train_refine, data + clip + ["--init", str(out / "match" / "checkpoint.pt"),
                                                          "--prompts", str(out / "prompt" / "prompts.pt"),
                                                          "--out", str(out / "refine")]))
    make_pseudo.main(_parse(make_pseudo, FAST + ["--data", toy_world["root"], "--split", "train", "--no-crf",
                                                 "--checkpoint", str(out / "refine" / "checkpoint.pt"),
                                                 "--out", str(out / "pseudo")]))
    return out


def _model(out, stage):
    return runtime.load_checkpoint(str(out / stage / "checkpoint.pt"), "mask_generator")["model"]


def test_deit_cam_network_trains_everything_but_the_final_norm(deit_pipeline, toy_world):
    ckpt = runtime.load_checkpoint(str(deit_pipeline / "cam" / "checkpoint.pt"), "mask_generator")
    assert ckpt["done"] and ckpt["args"]["backbone"] == "deit_toy"
    log = (deit_pipeline / "cam" / "log.txt").read_text()
    assert "L_cls_token" in log and "L_coarse" in log and "L_fine" in log
    runtime.seed_everything(504)
    fresh = network.new_mask_generator("deit_toy", toy_world["num_classes"]).state_dict()
    moved = {k for k, v in ckpt["model"].items() if not torch.equal(v, fresh[k])}
    assert {"net.cls_token", "net.patch_embed.proj.weight", "net.head.weight",
            "net.adaptive_attention_fusion.attn_head_ffn.0.weight"} <= moved
    assert not moved & {"net.norm.weight", "net.norm.bias"}  # never applied, never trained (as WeakTr)


def test_deit_stages_a_c_train_only_head_and_fusion(deit_pipeline):
    """--train head (the release's (a) and (c)): only the 3x3 head and the attention fusion move."""
    for before, after in (("cam", "match"), ("match", "refine")):
        a, b = _model(deit_pipeline, before), _model(deit_pipeline, after)
        moved = {k for k in a if not torch.equal(a[k], b[k])}
        assert moved and all(k.startswith(("net.head.", "net.adaptive_attention_fusion.")) for k in moved), moved
    args = runtime.load_checkpoint(str(deit_pipeline / "prompt" / "prompts.pt"), "prompts")["args"]
    assert args["backbone"] == "deit_toy" and args["size"] == 64


def test_deit_pseudo_masks_at_image_size_and_weaktr_threshold(deit_pipeline, toy_world):
    log = (deit_pipeline / "pseudo" / "log.txt").read_text()
    assert "--bg_threshold 0.43, the preset of a deit_toy S on toy" in log
    ids = datasets.read_ids(toy_world["root"], "train")
    with np.load(deit_pipeline / "pseudo" / "cams" / f"{ids[0]}.npz") as z:
        meta = json.loads(str(z["meta"]))
    assert meta["backbone"] == "deit_toy" and meta["size"] is None  # each image at its own size
    assert len(os.listdir(deit_pipeline / "pseudo" / "masks")) >= len(ids)


def test_weaktr_checkpoint_starts_stage_a(tmp_path, toy_world):
    """A WeakTr CAM checkpoint ({'model': ...}, hustvl/WeakTr's format) is an --init of stage (a) as it is: S is
    deit_s with its weights; a file for another class count is refused naming it."""
    K = toy_world["num_classes"]
    torch.manual_seed(1)
    net = deit.DeiTS(num_classes=K)
    deit.save_weaktr_checkpoint(net, tmp_path / "weaktr.pth", epoch=59)
    S, ckpt = network.load_mask_generator(str(tmp_path / "weaktr.pth"), "cpu", "--init", toy_world["class_names"])
    assert isinstance(S, network.DeiTMaskGenerator) and ckpt["args"]["backbone"] == "deit_s" and ckpt["epoch"] == 59
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in S.net.state_dict().items())
    with pytest.raises(ValueError, match="weaktr.pth"):
        network.load_mask_generator(str(tmp_path / "weaktr.pth"), "cpu", "--init", toy_world["class_names"][:-1])
