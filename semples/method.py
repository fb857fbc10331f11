"""The method's pieces: the frozen CLIP and its class texts, the masked CLIP samples, the paper's losses
(one function per equation: L_match Eq. 1, L_prompt Eq. 2, L_refine Eq. 3) and the learnable prompts.

Notation follows the paper (docs/method.md): for every class k present in image X,
    X^f_k = M_k * X,  X^b_k = (1 - M_k) * X,  v = E_I(.),  u^f_k = E_T("a photo of {k}."),  u^b_k = E_T(p_k)
and sim() is the cosine similarity clamped into [1e-4, 1 - 1e-4] before every log (as in CLIMS).
"""
import hashlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from semples.datasets import CLIP_NAMES
from semples.runtime import load_checkpoint

EPS = 1e-4
TEMPLATE = "a photo of {}."  # the class text u^f of every stage (the paper's)
FILLS = ("mean", "black")


# CLIP side: frozen model, class texts, masked samples
# ----------------------------------------------------------------------------------------------
def load_frozen_clip(name_or_path, device):
    """CLIP in fp32 (autocast handles bf16 on CUDA), eval mode, no parameter trains."""
    try:
        model, _ = clip.load(name_or_path, device="cpu")
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"--clip {name_or_path}: {str(e).removeprefix(f'{name_or_path}: ')}") from None
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # else every loss is NaN, and the advice to lower --lr would point the wrong way
        raise ValueError(f"--clip {name_or_path}: weights hold NaN or inf ({', '.join(bad[:3])}); the file is damaged "
                         "or was saved from a diverged run: use another CLIP file")
    model = model.float().to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def clip_name(name):
    return CLIP_NAMES.get(name, name)


def weights_fingerprint(state_dict):
    """A short hash of every tensor of a state dict (names included): what keys reused outputs."""
    h = hashlib.sha256()
    for name, t in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def clip_identity(clip_model):
    """A fingerprint of all CLIP weights, so that prompts learned with one CLIP are refused by another."""
    return weights_fingerprint(clip_model.state_dict())


@torch.no_grad()
def class_text_features(model, class_names, template=TEMPLATE):
    """u^f: one normalised text feature per class, computed once per run."""
    tokens = clip.tokenize([template.format(clip_name(c)) for c in class_names],
                           context_length=model.context_length)
    return F.normalize(model.encode_text(tokens.to(next(model.parameters()).device)).float(), dim=-1)


WORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "words.txt")  # the shipped vocabulary


def read_words(path, flag="--words"):
    """A word list: one word or short phrase a line; blank lines and '#' comments skipped, repeats dropped."""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise FileNotFoundError(f"{flag} {path}: cannot read it ({e.strerror}); pass a text file with one word "
                                "a line, e.g. the shipped words.txt") from None
    words = list(dict.fromkeys(w for w in lines if w and not w.startswith("#")))
    if not words:
        raise ValueError(f"{flag} {path} holds no words (one word or phrase a line, '#' starts a comment)")
    return words


@torch.no_grad()
def nearest_words(model, features, words, k=5, batch=256):
    """The k words whose text features E_T("a photo of {word}.") are closest (cosine) to each row of
    `features` [K, D] (normalised, e.g. the learned prompts u^b): per row, [[word, cosine], ...], best first.
    What a learned prompt "says", as the authors' release prints it."""
    text = torch.cat([class_text_features(model, words[i:i + batch]) for i in range(0, len(words), batch)])
    values, index = (features.float() @ text.t()).topk(min(k, len(words)), dim=-1)
    return [[[words[j], round(v, 4)] for v, j in zip(vs, js)] for vs, js in zip(values.tolist(), index.tolist())]


def clip_normalise(x):
    """Images in [0, 1] [B, 3, H, W] -> CLIP's input normalisation (its own mean/std)."""
    mean = torch.tensor(clip.MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_images(model, x):
    """v: normalised image features of images in [0, 1] at CLIP's resolution."""
    return F.normalize(model.encode_image(clip_normalise(x)).float(), dim=-1)


def fill_colour(fill, device=None):
    """The colour [3] in [0, 1] of masked-out pixels: CLIP's mean colour (0 after its normalisation) or black."""
    if fill not in FILLS:
        raise ValueError(f"--fill must be one of {FILLS}, got {fill!r}")
    return torch.tensor(clip.MEAN if fill == "mean" else (0.0, 0.0, 0.0), device=device)


def soft_masks(cams, resolution, align_corners=False, eps=1e-5):
    """M in [0, 1]: each CAM resized (bilinear) to the CLIP input and min-max normalised per map (the
    resize's corners and the eps are S's: network.mask_style)."""
    m = F.interpolate(cams.unsqueeze(1).float(), size=(resolution, resolution), mode="bilinear",
                      align_corners=align_corners)
    return minmax(m, eps)


def minmax(m, eps=1e-5):
    """Min-max normalisation of each map of [N, C, H, W] (over H, W)."""
    lo, hi = m.amin(dim=(-2, -1), keepdim=True), m.amax(dim=(-2, -1), keepdim=True)
    return (m - lo) / (hi - lo + eps)


def masked_pairs(images, cams, labels, resolution, fill="mean", align_corners=False, eps=1e-5):
    """One CLIP sample per (image, present class) pair: X^f = M * X and X^b = (1 - M) * X.

    `fill` is what the masked-out pixels become. 'mean' (default): CLIP's mean colour, i.e. the mask
    multiplies the *normalised* image, as CLIMS and the authors' release do; a removed region then looks
    like a flat grey backdrop, not like a black scene. 'black': the mask multiplies the raw pixels.
    `align_corners`, `eps`: how S's CAMs become masks (soft_masks; network.mask_style gives S's).
    Returns (X^f [P,3,r,r], X^b [P,3,r,r] in [0, 1], class index k [P], image index b [P], M [P,1,r,r])."""
    f = fill_colour(fill, images.device).view(1, 3, 1, 1)
    b, k = labels.nonzero(as_tuple=True)
    m = soft_masks(cams[b, k], resolution, align_corners, eps)
    x = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)[b]
    return m * x + (1 - m) * f, (1 - m) * x + m * f, k, b, m


def sim(a, b):
    """Cosine similarity of normalised features, clamped so that log() stays finite."""
    return (a * b).sum(-1).clamp(EPS, 1 - EPS)


# ----------------------------------------------------------------------------------------------
# The paper's losses, one function per equation (means over (image, class) pairs)
# ----------------------------------------------------------------------------------------------
def L_match(v_f, v_b, u_f, lambda_b):
    """Eq. 1, Segment-Label Matching: X^f should match "a photo of {k}.", X^b should not.
        L_match = E[ -log sim(v^f_k, u^f_k) - lambda_b * log(1 - sim(v^b_k, u^f_k)) ]
    u_f is already indexed by each pair's class. Returns (loss, foreground term, background term)."""
    fg = -torch.log(sim(v_f, u_f)).mean()
    bg = -torch.log(1 - sim(v_b, u_f)).mean()
    return fg + lambda_b * bg, fg, bg


def L_prompt(u_b, v_b, u_f, lambda_T, image_term=True):
    """Eq. 2, Contrastive Prompt Learning: the prompt u^b_k should match the background X^b of class k
    (L_prompt^I) and stay away from the class text u^f_k (L_prompt^T).
        L_prompt = E[ -log sim(u^b_k, v^b_k) + lambda_T * log sim(u^b_k, u^f_k) ]
    Returns (loss, I term, T term)."""
    term_I = -torch.log(sim(u_b, v_b)).mean()
    term_T = torch.log(sim(u_b, u_f)).mean()
    return (term_I if image_term else 0) + lambda_T * term_T, term_I, term_T


def L_refine(v_f, u_b):
    """Eq. 3, Prompt-guided Semantic Refinement: the foreground should not look like its class's
    background.  L_refine = E[ -log(1 - sim(v^f_k, u^b_k)) ]"""
    return -torch.log(1 - sim(v_f, u_b)).mean()


def L_area(M):
    """Not in SemPLeS: CLIMS's area term, the mean of the soft masks. L_match alone is lowest when M
    covers the whole image (the full image matches the class text, an empty background matches
    nothing); this term prices mask area."""
    return M.mean()


# ----------------------------------------------------------------------------------------------
# Learnable background prompts p_k, one token sequence per class (CoOp-style)
# ----------------------------------------------------------------------------------------------
class Prompts(nn.Module):
    """p [K, L, D] enters the text encoder as [SOT] + embed("a photo of") + p_k + embed(".") + [EOT].
    The official release initialises p uniformly in [0, 1)."""

    def __init__(self, model, num_classes, length=30, prefix="a photo of", suffix="."):
        super().__init__()
        pre, suf = _bare_tokens(prefix, model), _bare_tokens(suffix, model)
        need = 1 + len(pre) + length + len(suf) + 1
        if need > model.context_length:
            raise ValueError(f"--prompt_length {length} does not fit: the prompt needs {need} tokens, the "
                             f"CLIP context holds {model.context_length}")
        sot, eot = clip.tokenize([""], context_length=model.context_length)[0, :2].tolist()
        row = [sot] + pre + [0] * length + suf + [eot]
        tokens = torch.zeros(model.context_length, dtype=torch.long)
        tokens[: len(row)] = torch.tensor(row)
        self.register_buffer("tokens", tokens, persistent=False)
        self.start, self.length, self.eot = 1 + len(pre), length, len(row) - 1
        self.prompts = nn.Parameter(torch.rand(num_classes, length, model.token_embedding.weight.shape[1]))

    def forward(self, model):
        """u^b: normalised text features [K, D] of the K background prompts."""
        K = self.prompts.shape[0]
        x = model.token_embedding(self.tokens).unsqueeze(0).expand(K, -1, -1)
        x = torch.cat([x[:, : self.start], self.prompts.to(x.dtype), x[:, self.start + self.length:]], dim=1)
        eot = torch.full((K,), self.eot, dtype=torch.long, device=x.device)
        return F.normalize(model.encode_token_embeddings(x, eot).float(), dim=-1)


def _bare_tokens(text, model):
    """BPE ids of `text` without [SOT]/[EOT]."""
    t = clip.tokenize([text], context_length=model.context_length)[0]
    return t[1: int(t.argmax())].tolist()


@torch.no_grad()
def load_prompt_features(path, clip_model, class_names, flag="--prompts"):
    """u^b [K, D] from a stage (b) prompts file, re-encoded with `clip_model` after checking that the
    prompts were learned with the same CLIP (all weights) and for the same classes (names and order)."""
    ckpt = load_checkpoint(path, "prompts", flag, finished=True)
    if ckpt["class_names"] != list(class_names):
        raise ValueError(f"{flag} {path} was learned for classes {ckpt['class_names'][:4]}..., the dataset has "
                         f"{list(class_names)[:4]}...")
    if ckpt["fingerprint"] != clip_identity(clip_model):
        raise ValueError(f"{flag} {path} was learned with another CLIP ('{ckpt['clip']}'); pass the --clip it "
                         "was learned with, or rerun train_prompt.py")
    prompts = Prompts(clip_model, len(class_names), ckpt["prompts"].shape[1])
    prompts.prompts.copy_(ckpt["prompts"])
    return prompts.to(next(clip_model.parameters()).device)(clip_model)
