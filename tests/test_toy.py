"""The toy world: deterministic VOC-layout data with a measurable co-occurrence bias, and a tiny CLIP."""
import json
import os

import numpy as np
import pytest
import torch

import clip
from semples import datasets, method, runtime
from tools import make_toy

SPLITS = ("train_aug", "train", "val")
SMALL = dict(n_train=10, n_val=4, n_train_subset=5, size=48, cooccur=0.8, multi=0.25, quiet=True)


def _bytes(root, rel):
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()


def test_generator_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    make_toy.generate_dataset(a, seed=3, **SMALL)
    make_toy.generate_dataset(b, seed=3, **SMALL)
    make_toy.generate_dataset(c, seed=4, **SMALL)
    files = ["JPEGImages/toy_000000.jpg", "SegmentationClass/toy_000000.png", "JPEGImages/toy_000012.jpg",
             "SegmentationClass/toy_000013.png", "ImageSets/Segmentation/train.txt", "class_names.txt"]
    for rel in files:
        assert _bytes(a, rel) == _bytes(b, rel), rel
    assert _bytes(a, files[0]) != _bytes(c, files[0])
    assert _bytes(a, files[1]) != _bytes(c, files[1])


def test_layout_matches_the_reader(toy_world):
    root, K = toy_world["root"], toy_world["num_classes"]
    assert 6 <= K <= 10 and datasets.read_class_names(root) == toy_world["class_names"] == make_toy.NAMES
    ids = {s: datasets.read_ids(root, s) for s in SPLITS}
    assert len(ids["train_aug"]) == 64 and len(ids["val"]) == 32
    assert ids["train"] == ids["train_aug"][:32]
    assert not set(ids["val"]) & set(ids["train_aug"])
    for s in SPLITS:
        y = datasets.load_labels(root, ids[s], K)
        assert y.shape == (len(ids[s]), K) and y.dtype == np.float32
        assert (y.sum(1) >= 1).all(), f"an image of {s} has no label"
    for i in ids["val"][:4]:
        img = datasets.read_image(datasets.image_path(root, i))
        mask = datasets.read_mask(os.path.join(datasets.mask_dir(root), f"{i}.png"))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= set(range(K + 1)) | {255}


def test_masks_labels_and_meta_agree(toy_world):
    root, meta = toy_world["root"], toy_world["meta"]
    labels = datasets.derive_labels(root, sorted(meta["images"]))
    assert not os.path.exists(os.path.join(root, "cls_labels.json"))  # nothing derived is written into a dataset
    for i, info in meta["images"].items():
        mask = datasets.read_mask(os.path.join(root, "SegmentationClass", f"{i}.png"))
        in_mask = sorted(int(v) for v in np.unique(mask) if v not in (0, 255))
        drawn = sorted({make_toy.NAMES.index(o["cls"]) + 1 for o in info["objects"]})
        assert labels[i] == in_mask == drawn, i
        assert 1 <= len(info["objects"]) <= 3 and len(drawn) <= 2


def test_ignore_band_separates_objects_from_background(toy_world):
    root = toy_world["root"]
    for i in datasets.read_ids(root, "train_aug")[:20]:
        m = datasets.read_mask(os.path.join(root, "SegmentationClass", f"{i}.png")).astype(int)
        band = m == 255
        assert 0 < band.mean() < 0.3
        p = np.pad(m, 1, constant_values=255)
        for dy in range(3):  # no labelled pixel touches another label without the band in between
            for dx in range(3):
                n = p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
                assert not ((n != m) & (n != 255) & ~band).any(), i
        assert ((m > 0) & ~band).any()


def test_cooccurrence_matches_the_flag(toy_world):
    objs = [o for info in toy_world["meta"]["images"].values() for o in info["objects"]]
    rate = np.mean([o["surround"] == make_toy.HOME[o["cls"]] for o in objs])
    assert abs(rate - 0.8) < 0.12, rate
    for flag in (0.3, 0.95):  # more images, not written to disk
        infos = [make_toy.make_image(np.random.default_rng([7, i]), 48, flag, 0.25)[2] for i in range(200)]
        objs = [o for info in infos for o in info["objects"]]
        rate = np.mean([o["surround"] == make_toy.HOME[o["cls"]] for o in objs])
        assert abs(rate - flag) < 0.08, (flag, rate)


def test_skip_when_done(toy_world):
    root = toy_world["root"]
    path = os.path.join(root, "JPEGImages", "toy_000000.jpg")
    before = os.stat(path).st_mtime_ns, os.stat(toy_world["clip"]).st_mtime_ns
    from conftest import TOY_CLIP, TOY_WORLD
    assert make_toy.generate_dataset(root, quiet=True, **TOY_WORLD)["complete"]
    assert make_toy.pretrain_clip(root, toy_world["clip"], quiet=True, **TOY_CLIP)["config"] == make_toy.CLIP_CONFIG
    assert (os.stat(path).st_mtime_ns, os.stat(toy_world["clip"]).st_mtime_ns) == before


def test_tiny_clip_loads_and_encodes(toy_world):
    model, preprocess = clip.load(toy_world["clip"], device="cpu")
    meta = model.meta.get("meta", model.meta)
    assert meta["class_names"] == toy_world["class_names"] and meta["config"] == make_toy.CLIP_CONFIG
    assert model.context_length == 40 and model.visual.input_resolution == 64
    root = toy_world["root"]
    from PIL import Image
    img = Image.open(datasets.image_path(root, datasets.read_ids(root, "val")[0]))
    with torch.no_grad():
        v = model.encode_image(preprocess(img)[None])
        u = model.encode_text(clip.tokenize([t.format(n) for n in meta["class_names"] for t in make_toy.TEMPLATES],
                                            context_length=model.context_length))
    assert v.shape == (1, 128) and u.shape == (2 * toy_world["num_classes"], 128)
    assert torch.isfinite(v).all() and torch.isfinite(u).all()
    # a 30-token learned prompt fits the context: [SOT] a photo of <30> . [EOT]
    assert len(clip.tokenize(["a photo of" + " x" * 30 + "."], context_length=40)[0].nonzero()) <= 40
    assert 0 <= meta["eval"]["template0"]["zero_shot_acc"] <= 1


def test_holed_scenes_are_the_scene_with_a_flat_hole():
    """CLIP's scenery samples with a cut-out hole: the fill inside the outline, the scene beyond its widening."""
    g = torch.Generator().manual_seed(0)
    scenes = torch.randint(0, 256, (6, 3, 20, 20), generator=g).to(torch.uint8)
    masks = torch.zeros(2, 1, 20, 20)
    masks[:, :, 8:12, 8:12] = 1
    fills = torch.tensor([[10.0, 20.0, 30.0], [10.0, 20.0, 30.0]])
    out = make_toy._holed(scenes, masks, fills, g)
    assert out.dtype == torch.uint8 and out.shape == scenes.shape
    assert (out[:, :, 8:12, 8:12] == torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1)).all()
    assert torch.equal(out[:, :, :4], scenes[:, :, :4]) and torch.equal(out[:, :, 16:], scenes[:, :, 16:])


def test_short_pretraining_lowers_the_loss(toy_world):
    h = toy_world["clip_meta"]["loss_history"]
    assert len(h) == 30 and all(np.isfinite(h))
    assert np.mean(h[-5:]) < h[0] - 0.1, (h[0], h[-5:])


def test_pretraining_is_deterministic(toy_world, tmp_path):
    def run(name):
        return make_toy.pretrain_clip(toy_world["root"], str(tmp_path / name), steps=3, batch_size=16, bg_pool=2, cut_pool=8,
                                      threads=1, evaluate=False, quiet=True)["loss_history"]
    assert run("a.pt") == run("b.pt")


def test_geometry_is_fixed_and_keyed(toy_world, tmp_path):
    """--cone RHO --gap_cos KAPPA: the towers' last LayerNorm affine and projections are fixed (and stay so in
    training); every text feature has exactly sqrt(RHO) of its length along one shared direction, every image
    feature along another, the two directions meet at KAPPA, so every cosine lies in real CLIP's band; the
    saved meta keys the setting (a plain CLIP's meta has no such key, so plain worlds keep their key)."""
    rho, kappa = 0.75, 0.2
    args = dict(steps=3, batch_size=16, bg_pool=2, cut_pool=8, threads=1, evaluate=False, quiet=True)
    path = str(tmp_path / "cone.pt")
    meta = make_toy.pretrain_clip(toy_world["root"], path, cone=rho, gap_cos=kappa, **args)
    assert meta["pretrain_args"]["cone"] == rho and meta["pretrain_args"]["gap_cos"] == kappa
    assert "cone" not in toy_world["clip_meta"]["pretrain_args"]
    runtime.seed_everything(0)  # as pretrain_clip does before building the model (seed 0)
    init = clip.model.CLIP(**make_toy.CLIP_CONFIG)  # what the frozen ones start as, and must still be
    make_toy._fix_geometry(init, rho, kappa, 0)
    sd = torch.load(path, weights_only=True)["state_dict"]
    for name in ("ln_final.bias", "ln_final.weight", "text_projection", "visual.ln_post.bias",
                 "visual.ln_post.weight", "visual.proj"):
        # not bit-equal: the QR behind the projections rounds with the thread count (pretraining runs on 1);
        # one Adam step would move a trained entry by about lr = 1e-3, 1000x this tolerance
        torch.testing.assert_close(sd[name], init.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    d_t = torch.nn.functional.normalize(sd["text_projection"].sum(0), dim=0)
    d_i = torch.nn.functional.normalize(sd["visual.proj"].sum(0), dim=0)
    assert float(d_t @ d_i) == pytest.approx(kappa, abs=1e-5)
    model = method.load_frozen_clip(path, "cpu")
    words = make_toy.NAMES + make_toy.BACKGROUNDS
    t = method.class_text_features(model, words)  # "a photo of {w}.", normalised
    ids, x = make_toy._load_split(toy_world["root"], "val")
    v = method.encode_images(model, x[:16].float() / 255)
    assert torch.allclose(t @ d_t, torch.full((len(words),), rho ** 0.5), atol=1e-4)
    assert torch.allclose(v @ d_i, torch.full((16,), rho ** 0.5), atol=1e-4)
    assert (t @ t.T).min() >= 2 * rho - 1 - 1e-4  # the text cone: no cosine near 0 (plain tiny CLIP: -0.5)
    assert (v @ t.T).min() >= rho * kappa - (1 - rho) - 1e-4 and (v @ t.T).max() <= rho * kappa + (1 - rho) + 1e-4
    parse = make_toy.get_parser().parse_args
    assert parse(["--cone", "0.75"]).cone == 0.75 and parse([]).cone == 0.0 and parse([]).gap_cos == 0.2
    for bad in (["--cone", "1"], ["--cone", "-0.1"], ["--gap_cos", "1.5"]):
        with pytest.raises(SystemExit):
            parse(bad)
    other = clip.model.CLIP(**{**make_toy.CLIP_CONFIG, "embed_dim": 64})
    with pytest.raises(ValueError, match="--cone needs"):
        make_toy._fix_geometry(other, rho, kappa, 0)


def test_main_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "toy")
    make_toy.main(make_toy.get_parser().parse_args(
        ["--out", out, "--n_train", "16", "--n_val", "8", "--n_train_subset", "8", "--size", "48",
         "--clip_steps", "2", "--clip_batch", "16"]))
    text = capsys.readouterr().out
    assert "co-occurrence" in text and "zero-shot acc" in text and "the background alone" in text
    assert os.path.exists(os.path.join(out, "tiny_clip.pt"))
    meta = json.load(open(os.path.join(out, "toy_meta.json")))
    assert meta["complete"] and meta["args"]["n_train"] == 16 and meta["args"]["size"] == 48
    # a rerun without the dataset flags (as run.sh does) keeps this world: nothing is regenerated
    jpg = os.path.join(out, "JPEGImages", "toy_000000.jpg")
    before = os.stat(jpg).st_mtime_ns, os.stat(os.path.join(out, "tiny_clip.pt")).st_mtime_ns
    make_toy.main(make_toy.get_parser().parse_args(["--out", out, "--clip_steps", "2", "--clip_batch", "16"]))
    assert json.load(open(os.path.join(out, "toy_meta.json")))["args"] == meta["args"]
    assert (os.stat(jpg).st_mtime_ns, os.stat(os.path.join(out, "tiny_clip.pt")).st_mtime_ns) == before


def test_parts_dataset_then_clip(tmp_path):
    """run.sh's order: --part dataset writes no CLIP; --part clip trains it on that world, keeping the dataset,
    and refuses a folder without a world, or with another one than its flags ask for."""
    out = str(tmp_path / "toy")
    parse = make_toy.get_parser().parse_args
    small = ["--out", out, "--clip_steps", "2", "--clip_batch", "16"]
    with pytest.raises(ValueError, match="--part dataset` first"):
        make_toy.main(parse(small + ["--part", "clip"]))
    make_toy.main(parse(small + ["--n_train", "16", "--n_val", "8", "--n_train_subset", "8", "--size", "48",
                                 "--part", "dataset"]))
    assert not os.path.exists(os.path.join(out, "tiny_clip.pt"))
    jpg = os.path.join(out, "JPEGImages", "toy_000000.jpg")
    before = os.stat(jpg).st_mtime_ns
    with pytest.raises(ValueError, match="no complete world made with these flags"):
        make_toy.main(parse(small + ["--size", "64", "--part", "clip"]))
    make_toy.main(parse(small + ["--part", "clip"]))
    assert os.path.exists(os.path.join(out, "tiny_clip.pt")) and os.stat(jpg).st_mtime_ns == before
