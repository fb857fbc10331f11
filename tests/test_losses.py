"""The SemPLeS losses and the masked CLIP samples against hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

import clip
from semples import method
from semples.method import L_match, L_prompt, L_refine, masked_pairs

pytestmark = pytest.mark.smoke  # all of it: hand-computed losses, well under a second


def unit(*v):
    t = torch.tensor(v, dtype=torch.float64)
    return t / t.norm()


def test_L_match_by_hand():
    v_f = torch.stack([unit(1, 0), unit(1, 1)])
    v_b = torch.stack([unit(0, 1), unit(1, 0)])
    u_f = torch.stack([unit(1, 0), unit(1, 0)])
    # sims: fg (1 -> clamped 1-1e-4, 1/sqrt2), bg (0 -> clamped 1e-4, 1)
    fg = (-math.log(1 - 1e-4) - math.log(1 / math.sqrt(2))) / 2
    bg = (-math.log(1 - 1e-4) - math.log(1 - (1 - 1e-4))) / 2
    loss, got_fg, got_bg = L_match(v_f, v_b, u_f, lambda_b=2.4)
    assert got_fg.item() == pytest.approx(fg, rel=1e-9)
    assert got_bg.item() == pytest.approx(bg, rel=1e-9)
    assert loss.item() == pytest.approx(fg + 2.4 * bg, rel=1e-9)


def test_L_prompt_by_hand():
    u_b = torch.stack([unit(1, 2), unit(3, 1)])
    v_b = torch.stack([unit(1, 1), unit(1, 0)])
    u_f = torch.stack([unit(0, 1), unit(1, -1)])  # second sim is positive: 2/sqrt(20)
    s_I = [3 / math.sqrt(10), 3 / math.sqrt(10)]
    s_T = [2 / math.sqrt(5), 2 / math.sqrt(20)]
    term_I = -sum(math.log(s) for s in s_I) / 2
    term_T = sum(math.log(s) for s in s_T) / 2
    loss, got_I, got_T = L_prompt(u_b, v_b, u_f, lambda_T=0.02)
    assert got_I.item() == pytest.approx(term_I, rel=1e-9)
    assert got_T.item() == pytest.approx(term_T, rel=1e-9)
    assert loss.item() == pytest.approx(term_I + 0.02 * term_T, rel=1e-9)
    only_T, _, _ = L_prompt(u_b, v_b, u_f, lambda_T=0.02, image_term=False)
    assert only_T.item() == pytest.approx(0.02 * term_T, rel=1e-9)


def test_L_refine_by_hand_and_clamp():
    v_f = torch.stack([unit(1, 1), unit(1, 0)])
    u_b = torch.stack([unit(1, 0), unit(-1, 0)])  # second sim -1 -> clamped to 1e-4
    want = (-math.log(1 - 1 / math.sqrt(2)) - math.log(1 - 1e-4)) / 2
    assert L_refine(v_f, u_b).item() == pytest.approx(want, rel=1e-9)


def test_masked_pairs_one_sample_per_present_class():
    images = torch.rand(2, 3, 8, 8)
    masks = torch.rand(2, 3, 4, 4)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    X_f, X_b, k, b, M = masked_pairs(images, masks, labels, resolution=8, fill="black")
    assert k.tolist() == [0, 2, 1] and b.tolist() == [0, 0, 1]
    m = F.interpolate(masks[1:2, 1:2], size=(8, 8), mode="bilinear", align_corners=False)
    m = (m - m.min()) / (m.max() - m.min() + 1e-5)  # min-max per map
    assert torch.allclose(M[2], m[0], atol=1e-6)
    assert torch.allclose(X_f[2], (m * images[1])[0], atol=1e-6)
    assert torch.allclose(X_b[2], ((1 - m) * images[1])[0], atol=1e-6)
    assert torch.allclose(X_f + X_b, images[b], atol=1e-6)


def normalise(x):
    return (x - torch.tensor(clip.MEAN).view(1, 3, 1, 1)) / torch.tensor(clip.STD).view(1, 3, 1, 1)


def test_mean_fill_is_the_mask_times_the_normalised_image():
    """--fill mean (the default): masked-out pixels take CLIP's mean colour, so that what CLIP sees is M times
    the normalised image, as CLIMS and the release compute it; --fill black: 0 before normalisation."""
    images = torch.rand(2, 3, 8, 8)
    masks = torch.rand(2, 3, 4, 4)
    labels = torch.tensor([[1.0, 1, 0], [0, 1, 1]])
    X_f, X_b, k, b, M = masked_pairs(images, masks, labels, resolution=8)
    assert torch.allclose(normalise(X_f), M * normalise(images[b]), atol=1e-5)
    assert torch.allclose(normalise(X_b), (1 - M) * normalise(images[b]), atol=1e-5)
    fully_out = M.flatten(1).argmin(1)  # the pixel each mask removes most (M = 0 after min-max)
    pixel = X_f.flatten(2)[torch.arange(len(k)), :, fully_out]
    assert torch.allclose(pixel, torch.tensor(clip.MEAN).expand_as(pixel), atol=1e-5)
    black = masked_pairs(images, masks, labels, resolution=8, fill="black")[0]
    assert torch.allclose(black.flatten(2)[torch.arange(len(k)), :, fully_out], torch.zeros_like(pixel), atol=1e-5)
    with pytest.raises(ValueError, match="--fill"):
        masked_pairs(images, masks, labels, resolution=8, fill="grey")


def tiny_clip():
    torch.manual_seed(0)
    model = clip.model.CLIP(32, 32, 1, 64, 16, 24, 49408, 64, 1, 2)
    model.initialize_parameters()
    return model.eval()


def test_prompt_path_reproduces_text_encoder():
    """Prompts set to the token embeddings of real words give exactly encode_text of the sentence."""
    model = tiny_clip()
    words = clip.tokenize(["red car"], context_length=24)[0, 1:3]
    prompts = method.Prompts(model, num_classes=2, length=2)
    with torch.no_grad():
        prompts.prompts.copy_(model.token_embedding(words).unsqueeze(0).expand(2, -1, -1))
        u_b = prompts(model)
        want = F.normalize(model.encode_text(clip.tokenize(["a photo of red car."], context_length=24)), dim=-1)
    assert torch.allclose(u_b, want.expand(2, -1), atol=1e-6)


def test_prompt_too_long_for_context():
    with pytest.raises(ValueError, match="prompt_length"):
        method.Prompts(tiny_clip(), num_classes=2, length=30)
