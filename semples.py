"""The algorithm pieces the SemPLeS stages share: the mask generator S, the masked CLIP samples, the
losses L_match (Eq. 1), L_prompt (Eq. 2) and L_refine (Eq. 3), and the learnable background prompts.

Notation follows the paper (docs/method.md): for every class k present in image X,
    X^f_k = M_k * X,  X^b_k = (1 - M_k) * X,  v = E_I(.),  u^f_k = E_T("a photo of {k}."),  u^b_k = E_T(p_k)
and sim() is the cosine similarity clamped into [1e-4, 1 - 1e-4] before every log (as in CLIMS).
"""
import hashlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock

import clip
from common import CLIP_NAMES, load_checkpoint, read_torch_file

EPS = 1e-4
TEMPLATE = "a photo of {}."  # the class text u^f of every stage (the paper's)
FILLS = ("mean", "black")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKBONES = ("resnet50", "resnet101", "resnet18", "resnet34", "tiny")


# ----------------------------------------------------------------------------------------------
# The mask generator S: backbone -> 1x1 classifier -> one class activation map per class
# ----------------------------------------------------------------------------------------------
def _tiny_backbone():
    """A three-stage ResNet of BasicBlocks at output stride 8, small enough for the toy world on CPU."""
    def stage(cin, cout, stride):
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return BasicBlock(cin, cout, stride, down)
    stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
    return nn.Sequential(stem, stage(32, 64, 2), stage(64, 128, 2), stage(128, 256, 1)), 256


def _dilate(layer, dilation):
    """Turn a ResNet stage's stride 2 into dilation, keeping the receptive field (DeepLab's trick).
    Works for Basic and Bottleneck blocks alike, unlike torchvision's replace_stride_with_dilation."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


def build_backbone(name, output_stride):
    """Returns (feature extractor, channels). torchvision ResNets are dilated to `output_stride`."""
    if name == "tiny":
        return _tiny_backbone()
    if name not in BACKBONES:
        raise ValueError(f"--backbone {name} unknown; choose from {BACKBONES}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"--output_stride must be 8, 16 or 32, got {output_stride}")
    net = getattr(torchvision.models, name)(weights=None)
    if output_stride <= 16:
        _dilate(net.layer4, 2 if output_stride == 16 else 4)
    if output_stride == 8:
        _dilate(net.layer3, 2)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return body, net.fc.in_features


def load_imagenet_backbone(body, state_dict, path, backbone):
    """Load torchvision ImageNet ResNet weights (fc dropped) into a body made by build_backbone."""
    order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    renamed = {f"{order.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v for k, v in state_dict.items()
               if k.split(".")[0] in order}
    try:
        missing, unexpected = body.load_state_dict(renamed, strict=False)
    except RuntimeError as e:  # shape mismatch, e.g. ResNet-18 weights for a ResNet-50
        raise ValueError(f"--init {path} does not fit --backbone {backbone}: {str(e).splitlines()[1]}") from e
    if missing or unexpected:
        raise ValueError(f"--init {path} does not fit --backbone {backbone}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


class MaskGenerator(nn.Module):
    """S: image in [0, 1] -> class activation maps [B, K, h, w] (logits). The soft masks M in [0, 1] are
    the CAMs min-max normalised per map (masked_pairs; as the authors' release, and not a sigmoid, which
    saturates once classification has made the logits large). The pooled class scores (global average of
    the CAMs, equal to a linear classifier on pooled features) feed the optional classification loss
    that makes S a CAM network in the first place.
    """

    def __init__(self, backbone="resnet50", num_classes=20, output_stride=16, clusters=None):
        super().__init__()
        self.backbone, channels = build_backbone(backbone, output_stride)
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)  # the CLIMS/IRN 1x1 classifier
        # Category clusters (optional, train_cam.py --clusters; docs/method.md): one shared map per cluster,
        # added to the map of each of its classes. Zero at the start, so S starts as the plain CAM network.
        self.clusters = [list(c) for c in clusters] if clusters else None
        if self.clusters:
            of = [i for k in range(num_classes) for i, members in enumerate(self.clusters) if k in members]
            if sorted(k for c in self.clusters for k in c) != list(range(num_classes)):
                raise ValueError(f"clusters {self.clusters} must hold each of the {num_classes} classes once")
            self.register_buffer("cluster_of", torch.tensor(of), persistent=False)
            self.cluster_classifier = nn.Conv2d(channels, len(self.clusters), 1, bias=False)
            nn.init.zeros_(self.cluster_classifier.weight)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.frozen_backbone = False

    def set_trainable(self, part):
        """'all', or 'head': only the 1x1 classifier (and the clusters' 1x1 layer, if any) trains, on the
        fixed features of the CAM network (the authors' release detaches the backbone features in (a), (c))."""
        if part not in ("all", "head"):
            raise ValueError(f"--train must be 'all' or 'head', got {part!r}")
        self.frozen_backbone = part == "head"
        for p in self.backbone.parameters():
            p.requires_grad_(not self.frozen_backbone)
        return self

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()  # fixed features: BatchNorm keeps the CAM network's statistics
        return self

    def features(self, x):
        """The backbone's features of images in [0, 1]; without gradients when the backbone is frozen."""
        x = (x - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            return self.backbone(x)

    def forward(self, x, cluster_maps=False, from_features=False):
        """CAMs [B, K, h, w]; with `cluster_maps` (train_cam.py --clusters) also the clusters' shared maps
        [B, C, h, w], which cluster-level supervision trains. `from_features`: x is already self.features()
        of the images (the trainer's feature cache, with a frozen backbone)."""
        features = x if from_features else self.features(x)
        cams = self.classifier(features)
        if self.clusters is None:
            if cluster_maps:
                raise ValueError("this S has no clusters (train_cam.py --clusters)")
            return cams
        shared = self.cluster_classifier(features)
        cams = cams + shared[:, self.cluster_of]  # each class draws on what its cluster shares
        return (cams, shared) if cluster_maps else cams


def build_mask_generator(backbone, num_classes, output_stride, init=None, clusters=None):
    """A fresh S for train_cam.py; `init` is an ImageNet torchvision state-dict file (backbone only) or
    None (random init, fine for the toy world); `clusters` a list of class-index lists, or None."""
    S = MaskGenerator(backbone, num_classes, output_stride, clusters)
    if not init:
        return S
    obj = read_torch_file(init, "--init", "pass an ImageNet torchvision state-dict file, or nothing (random init)")
    if not (isinstance(obj, dict) and "conv1.weight" in obj):
        raise ValueError(f"--init {init} is not a torchvision ImageNet state dict (expected keys like "
                         "'conv1.weight')")
    load_imagenet_backbone(S.backbone, obj, init, backbone)
    return S


def load_mask_generator(path, device, flag="--checkpoint", class_names=None):
    """Rebuild S from a stage checkpoint alone (the architecture is in the checkpoint's args); with
    `class_names`, refuse a checkpoint trained for other classes (names and order, not only the count)."""
    ckpt = load_checkpoint(path, "mask_generator", flag)
    if class_names is not None and ckpt["class_names"] != list(class_names):
        raise ValueError(f"{flag} {path} was trained for classes {ckpt['class_names'][:4]}... "
                         f"({ckpt['num_classes']}), the dataset has {list(class_names)[:4]}... ({len(class_names)})")
    a = ckpt["args"]
    S = MaskGenerator(a["backbone"], ckpt["num_classes"], a["output_stride"], ckpt.get("clusters"))
    S.load_state_dict(ckpt["model"])
    return S.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------
# CLIP side: frozen model, class texts, masked samples
# ----------------------------------------------------------------------------------------------
def load_frozen_clip(name_or_path, device):
    """CLIP in fp32 (autocast handles bf16 on CUDA), eval mode, no parameter trains."""
    try:
        model, _ = clip.load(name_or_path, device="cpu")
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"--clip {name_or_path}: {e}") from None
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


def soft_masks(cams, resolution):
    """M in [0, 1]: each CAM resized (bilinear) to the CLIP input and min-max normalised per map."""
    m = F.interpolate(cams.unsqueeze(1).float(), size=(resolution, resolution), mode="bilinear",
                      align_corners=False)
    return minmax(m)


def minmax(m, eps=1e-5):
    """Min-max normalisation of each map of [N, C, H, W] (over H, W)."""
    lo, hi = m.amin(dim=(-2, -1), keepdim=True), m.amax(dim=(-2, -1), keepdim=True)
    return (m - lo) / (hi - lo + eps)


def masked_pairs(images, cams, labels, resolution, fill="mean"):
    """One CLIP sample per (image, present class) pair: X^f = M * X and X^b = (1 - M) * X.

    `fill` is what the masked-out pixels become. 'mean' (default): CLIP's mean colour, i.e. the mask
    multiplies the *normalised* image, as CLIMS and the authors' release do; a removed region then looks
    like a flat grey backdrop, not like a black scene. 'black': the mask multiplies the raw pixels.
    Returns (X^f [P,3,r,r], X^b [P,3,r,r] in [0, 1], class index k [P], image index b [P], M [P,1,r,r])."""
    f = fill_colour(fill, images.device).view(1, 3, 1, 1)
    b, k = labels.nonzero(as_tuple=True)
    m = soft_masks(cams[b, k], resolution)
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
    ckpt = load_checkpoint(path, "prompts", flag)
    if ckpt["class_names"] != list(class_names):
        raise ValueError(f"{flag} {path} was learned for classes {ckpt['class_names'][:4]}..., the dataset has "
                         f"{list(class_names)[:4]}...")
    if ckpt["fingerprint"] != clip_identity(clip_model):
        raise ValueError(f"{flag} {path} was learned with another CLIP ('{ckpt['clip']}'); pass the --clip it "
                         "was learned with, or rerun train_prompt.py")
    prompts = Prompts(clip_model, len(class_names), ckpt["prompts"].shape[1])
    prompts.prompts.copy_(ckpt["prompts"])
    return prompts.to(next(clip_model.parameters()).device)(clip_model)
