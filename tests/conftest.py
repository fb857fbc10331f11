"""Shared pytest fixtures. `toy_world` is a small toy dataset plus a tiny CLIP, built once per session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Small enough to build in seconds on 2 CPU cores; the stage tests train on it.
TOY_WORLD = dict(n_train=64, n_val=32, n_train_subset=32, size=64, seed=0, cooccur=0.8, multi=0.25)
TOY_CLIP = dict(steps=30, batch_size=32, lr=1e-3, bg_pool=8, cut_pool=32, seed=0, threads=1)


@pytest.fixture(scope="session", autouse=True)
def label_cache(tmp_path_factory):
    """Derived image labels (datasets.derive_labels) are cached in a session folder, not in the home directory;
    subprocesses inherit it."""
    os.environ["SEMPLES_CACHE"] = str(tmp_path_factory.mktemp("semples_cache"))


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A toy dataset in VOC layout (64 train_aug, 32 of them in train, 32 val, 64 px) and a tiny CLIP
    pretrained for 30 steps (full toy architecture: 64 px ViT, context 40, real BPE vocabulary).

    Returns {"root": dataset folder, "clip": path of tiny_clip.pt (clip.load reads it),
    "num_classes": K, "class_names": [K names], "meta": toy_meta.json dict,
    "clip_meta": the pretraining meta incl. "loss_history"}. Treat it as read-only."""
    from tools import make_toy

    root = str(tmp_path_factory.mktemp("toy"))
    meta = make_toy.generate_dataset(root, quiet=True, **TOY_WORLD)
    clip_path = os.path.join(root, "tiny_clip.pt")
    clip_meta = make_toy.pretrain_clip(root, clip_path, quiet=True, **TOY_CLIP)
    return {"root": root, "clip": clip_path, "num_classes": len(meta["class_names"]),
            "class_names": list(meta["class_names"]), "meta": meta, "clip_meta": clip_meta}
