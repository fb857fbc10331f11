"""World 2 (tools/make_toy2.py): an independent toy world in VOC layout with its own tiny CLIP."""
import os
import time

import numpy as np
import pytest
import torch

import clip
from semples import datasets
from tools import make_toy2

TINY = ["--n_train", "40", "--n_val", "10", "--n_train_subset", "12", "--clip_steps", "5", "--clip_batch", "16",
        "--aux_pool", "18", "--quiet"]
MAKE_TOY_CLASSES = {"boat", "plane", "car", "train", "cow", "sofa", "camel", "bird"}


def _make(out, *extra):
    return make_toy2.main(make_toy2.get_parser().parse_args(["--out", str(out), *TINY, *extra]))


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2")
    return out, _make(out)


@pytest.mark.smoke
def test_scene_is_deterministic_and_well_formed():
    a = make_toy2.make_scene(np.random.default_rng([5, 1, 3]), 96, 0.9, 0.25)
    b = make_toy2.make_scene(np.random.default_rng([5, 1, 3]), 96, 0.9, 0.25)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and a[2] == b[2]
    img, mask, info = a
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and mask.shape == (96, 96)
    assert set(np.unique(mask).tolist()) <= set(range(9)) | {255}
    drawn = {make_toy2.CLASSES.index(o["cls"]) + 1 for o in info["objects"]}
    assert {int(v) for v in np.unique(mask)} - {0, 255} == drawn


def test_classes_are_new_single_tokens():
    assert len(make_toy2.CLASSES) == 8 and not set(make_toy2.CLASSES) & MAKE_TOY_CLASSES
    for c in make_toy2.CLASSES:
        assert c.isalpha() and c.islower()
        assert int(clip.tokenize([c])[0].argmax()) == 2, c  # SOT, one BPE token, EOT
    shared = [bs[0] for bs in make_toy2.USUAL.values() if len(bs) == 1]
    assert sum(shared.count(b) >= 2 for b in set(shared)) >= 2  # two pairs share a usual background
    assert any(len(bs) == 2 for bs in make_toy2.USUAL.values())  # a class with two usual backgrounds


def test_voc_layout(world):
    out, meta = world
    ids = {s: datasets.read_ids(str(out), s) for s in ("train_aug", "train", "val")}
    assert len(ids["train_aug"]) == 40 and len(ids["val"]) == 10 and ids["train"] == ids["train_aug"][:12]
    assert not set(ids["val"]) & set(ids["train_aug"])
    assert all(i.startswith("w2_") for s in ids.values() for i in s)
    names = datasets.read_class_names(str(out))
    assert names == make_toy2.CLASSES and not set(names) & MAKE_TOY_CLASSES
    for i in ids["train_aug"] + ids["val"]:
        img = datasets.read_image(datasets.image_path(str(out), i))
        mask = datasets.read_mask(os.path.join(datasets.mask_dir(str(out)), f"{i}.png"))
        assert img.shape == (96, 96, 3) and mask.shape == (96, 96)
        assert set(np.unique(mask).tolist()) <= set(range(9)) | {255}
        assert (mask == 255).any() and ((mask > 0) & (mask < 255)).any()
    assert not os.path.exists(os.path.join(out, "toy_meta.json"))
    assert meta["complete"] and list(meta)[-1] == "complete" and "fidelity" in meta


def test_same_seed_same_bytes_and_rerun_skips(world, tmp_path):
    out, _ = world
    _make(tmp_path)
    for rel in ["JPEGImages/w2_000000.jpg", "SegmentationClass/w2_000007.png", "JPEGImages/w2_000045.jpg",
                "ImageSets/Segmentation/train.txt"]:
        assert _bytes(os.path.join(out, rel)) == _bytes(os.path.join(tmp_path, rel)), rel
    stamp = os.path.getmtime(os.path.join(tmp_path, "tiny_clip.pt"))
    t0 = time.time()
    _make(tmp_path)
    assert time.time() - t0 < 5 and os.path.getmtime(os.path.join(tmp_path, "tiny_clip.pt")) == stamp


def test_clip_load_reads_the_checkpoint(world):
    out, _ = world
    model, _ = clip.load(os.path.join(out, "tiny_clip.pt"), device="cpu")
    ckpt = torch.load(os.path.join(out, "tiny_clip.pt"), map_location="cpu", weights_only=True)
    same = clip.model.CLIP(**make_toy2.CLIP_CONFIG).eval()
    same.load_state_dict(ckpt["state_dict"])
    x = torch.randn(2, 3, 56, 56)
    t = clip.tokenize(["a photo of fish.", "a photo of robot."], context_length=model.context_length)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), same.encode_image(x), atol=1e-5)
        assert torch.allclose(model.encode_text(t), same.encode_text(t), atol=1e-5)
    assert model.visual.input_resolution == 56 and model.transformer.resblocks[0].attn.num_heads == 3
