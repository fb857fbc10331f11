"""A plain-PyTorch implementation of OpenAI CLIP that loads the official checkpoints.

    model, preprocess = clip.load("ViT-B/16")
    logits_per_image, logits_per_text = model(preprocess(pil_image)[None], clip.tokenize(["a dog", "a cat"]))
"""
from .clip import MEAN, STD, available_models, load, tokenize
from .model import CLIP, build_model

__all__ = ["available_models", "load", "tokenize", "build_model", "CLIP", "MEAN", "STD"]
