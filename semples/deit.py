"""The paper's mask generator S as WeakTr builds it (hustvl/WeakTr, its "V3" code, which the SemPLeS release
forks): a DeiT-S with one class token per class, a 3x3 convolutional CAM head on the patch tokens, and the
adaptive attention fusion (AAF) that weighs every attention map of every block and refines the CAM with the
fused patch affinity. Plain PyTorch; timm is only the tests' oracle.

What this module relies on (read from WeakTr's models.py, AAF.py and vision_transformer.py, and from the SemPLeS
release's models123.py; written down here so that the code does not depend on anyone's notes):

* Backbone. Pre-norm ViT: patch conv (kernel = stride = patch, with bias) -> [K class tokens, patch tokens]
  + position embedding -> L blocks of x + drop_path(proj(attn(norm1 x))), x + drop_path(fc2(GELU(fc1(norm2 x)))).
  DeiT-S: patch 16, width 384, 12 blocks, 6 heads, MLP 1536 with exact GELU, LayerNorm eps 1e-6, qkv bias,
  stochastic depth rising linearly from 0 to 0.1 over the blocks, no dropout. Attention is
  softmax(q k^T / sqrt(D/Hd)); the maps kept for the fusion are the softmax weights. The final `norm` exists
  (it is in every checkpoint) but WeakTr never applies it, and neither do we (so under DDP it needs
  find_unused_parameters, or to be dropped).
* Class tokens. `cls_token` [1, K, D], `pos_embed` [1, K + P, D], tokens ordered [class tokens, patch tokens].
  The class-token logit is the mean over the D channels of that token's last-block output.
* Other input sizes. The K class positions are kept; the trained g x g grid of patch positions is resized
  bicubic (align_corners=False) with scale_factor=((H//p + 0.1)/g, (W//p + 0.1)/g), not with size=: the scale
  factor enters the sampling positions, so the values differ measurably from a size= resize; copying it is what
  reproduces a WeakTr checkpoint's CAMs. As in WeakTr, the embedding is used unchanged when the patch count is
  g*g and the image is square in pixels (H == W), and resized otherwise (even 224 x 230, whose grid is 14 x 14).
* Coarse CAM. Patch tokens -> [B, D, H/p, W/p] -> Conv2d(D, K, 3, padding 1, bias). The coarse logit is its
  global average (no ReLU); the CAM passed on is relu(head output).
* Fusion (AAF, V3). Inputs, all detached: the L*Hd attention maps, channel c = head*L + layer, and each block's
  attention-branch output after `proj` (before drop-path), split into Hd groups of D/Hd channels that are
  *interleaved*: group j holds channels j, j+Hd, j+2Hd, ... Per (head, layer): pool over tokens (max on VOC,
  the release's COCO commands use avg) -> Linear(D/Hd, D/Hd/8) -> Linear(D/Hd/8, 1), no activation between,
  giving [B, L*Hd]; then Linear(L*Hd, L*Hd/r, bias=False) -> ReLU -> Linear(L*Hd/r, L*Hd, bias=False) ->
  sigmoid, one weight per map (r = 8 on VOC). fused = mean over the L*Hd maps of weight x map, [B, N, N].
  WeakTr sizes the hidden layers int(width / reduction); for the toy world's tiny widths we floor that at 1.
* Fine CAM. class attention = fused[:, :K, K:] -> [B, K, h, w]; patch affinity = fused[:, K:, K:] (rows not
  renormalised); CAMs = class attention x relu(coarse CAM); fine CAM = affinity @ CAMs (over the flattened
  grid); the fine logit is its global average. Everything in it is >= 0.
* Gradients. WeakTr's CAM training ("all" here): the coarse CAM is detached before the fine CAM, so the fine
  loss trains only the fusion module; the class-token and coarse losses train the transformer (and head).
  The SemPLeS release's stages (a)/(c) ("head" here): the patch tokens are detached before the head and the
  head output is *not* detached before the fine CAM, so losses on the fine CAM (the masks) reach the head and
  the fusion, the only modules that train (70,965 parameters for DeiT-S on VOC). We also freeze the
  backbone's parameters and run it without autograd. The release leaves the backbone in train mode (drop-path
  active) in those stages; by default we put it in eval mode there (fixed features, as the ResNet S does);
  set_trainable("head", backbone_drop_path=True) reproduces the release.
* Inputs are ImageNet-normalised images (mean 0.485/0.456/0.406, std 0.229/0.224/0.225), as for timm and
  WeakTr; a wrapper that takes [0, 1] images normalises first.
* Initialisation as WeakTr: backbone Linear layers truncated normal (std 0.02, bias 0), LayerNorms 1/0,
  class tokens and positions truncated normal 0.02; the patch conv, the conv head and the fusion keep
  PyTorch's default initialisation.

Files.
* load_imagenet_deit: the DeiT authors' deit_small_patch16_224-cd65a155.pth, {'model': state dict} with timm's
  key names (cls_token, pos_embed [1, 1+196, 384], patch_embed.proj.*, blocks.i.{norm1, attn.qkv, attn.proj,
  norm2, mlp.fc1, mlp.fc2}.*, norm.*, head.*). Its class token and class position are repeated K times, head.*
  (the 1000-way classifier) is dropped, everything else lands unchanged; a file whose grid differs from the
  model's has its patch positions resized bicubic with size= (WeakTr's fine-tuning code does the same).
* save_weaktr_checkpoint / load_weaktr_checkpoint: WeakTr's CAM checkpoint, {'model': state_dict, 'epoch': ..}.
  Our module names are WeakTr's, so the state dict is WeakTr's key for key: the timm names above, `head.*` the
  conv head [K, D, 3, 3], and the fusion under adaptive_attention_fusion.attn_feat_ffn.{0,1}.{weight,bias}
  and adaptive_attention_fusion.attn_head_ffn.{0,2}.weight (index 1 is the ReLU, 3 the sigmoid). A 'module.'
  prefix (a DDP-wrapped save) is accepted on load. The pool type (max/avg) is not in the file; pass it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from semples.runtime import read_torch_file

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# DeiT-S with WeakTr's V3 fusion on VOC (--reduction 8 --feat-reduction 8 --pool-type max).
DEIT_S = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
              drop_path_rate=0.1, reduction=8, feat_reduction=8, pool="max")


# ----------------------------------------------------------------------------------------------
# Building blocks (module and parameter names are timm's / WeakTr's, so state dicts match key for key)
# ----------------------------------------------------------------------------------------------
def drop_path(x, p, training):
    """Stochastic depth: zero the residual branch of a whole sample with probability p, scale the rest by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, P, D], row-major over the grid


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """Returns (proj output [B, N, D], softmax attention weights [B, Hd, N, N])."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path_p):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_p = drop_path_p

    def forward(self, x):
        """Returns (tokens, attention weights [B, Hd, N, N], attention-branch output after proj [B, N, D])."""
        o, attn = self.attn(self.norm1(x))
        x = x + drop_path(o, self.drop_path_p, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_p, self.training)
        return x, attn, o


class AdaptiveAttentionFusion(nn.Module):
    """WeakTr V3's AAF: one weight in (0, 1) per attention map from the pooled attention-branch features."""

    def __init__(self, channels, group_width, reduction=8, feat_reduction=8, pool="max"):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"fusion pool must be 'max' or 'avg', got {pool!r}")
        self.pool = pool
        # WeakTr: int(width / reduction); the 1e-6 keeps a reduction read back from a file's shapes exact
        feat_hidden = max(1, int(group_width / feat_reduction + 1e-6))
        hidden = max(1, int(channels / reduction + 1e-6))
        self.attn_feat_ffn = nn.Sequential(nn.Linear(group_width, feat_hidden), nn.Linear(feat_hidden, 1))
        self.attn_head_ffn = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(),
                                           nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def weights(self, feats):
        """feats [B, C, N, m] (C maps, N tokens, m channels of the map's group) -> weights [B, C]."""
        pooled = feats.amax(dim=2) if self.pool == "max" else feats.mean(dim=2)  # [B, C, m]
        return self.attn_head_ffn(self.attn_feat_ffn(pooled).squeeze(-1))

    def forward(self, feats, maps):
        """maps [B, C, N, N] -> (fused [B, N, N] = mean over C of weight x map, weights [B, C])."""
        w = self.weights(feats)
        return torch.einsum("bc,bcnm->bnm", w, maps) / maps.shape[1], w


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
class DeiTS(nn.Module):
    """DeiT backbone with K class tokens + WeakTr's conv CAM head and adaptive attention fusion.

    forward(x) -> (class-token logits, coarse logits, fine logits), each [B, K] (training).
    cams(x) -> (fine CAM, coarse CAM), each [B, K, H//p, W//p], both >= 0 (CAM inference; the fine CAM is
    the refined one WeakTr thresholds). forward_all(x) returns every intermediate in a dict.
    x: ImageNet-normalised images [B, 3, H, W], any size (H, W >= patch)."""

    def __init__(self, num_classes=20, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, drop_path_rate=0.1, reduction=8, feat_reduction=8, pool="max"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.config = dict(num_classes=num_classes, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                           reduction=reduction, feat_reduction=feat_reduction, pool=pool)
        self.num_classes, self.patch_size, self.embed_dim = num_classes, patch_size, embed_dim
        self.depth, self.num_heads = depth, num_heads
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_classes + self.grid ** 2, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # loaded, never applied (as WeakTr)
        self.head = nn.Conv2d(embed_dim, num_classes, 3, padding=1)
        self.adaptive_attention_fusion = AdaptiveAttentionFusion(depth * num_heads, embed_dim // num_heads,
                                                                 reduction, feat_reduction, pool)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.frozen_backbone = False
        self.backbone_drop_path = True

    # --- what trains ---------------------------------------------------------------------------
    def head_parameters(self):
        """The conv head and the fusion module: what trains in set_trainable('head')."""
        return list(self.head.parameters()) + list(self.adaptive_attention_fusion.parameters())

    def set_trainable(self, part, backbone_drop_path=False):
        """'all' (WeakTr's CAM training) or 'head' (the release's stages (a)/(c)): only the conv head and the
        fusion train; the patch tokens are detached before the head. `backbone_drop_path`: keep drop-path
        active in the frozen backbone during training, as the release does (default: off, fixed features)."""
        if part not in ("all", "head"):
            raise ValueError(f"--train must be 'all' or 'head', got {part!r}")
        self.frozen_backbone = part == "head"
        self.backbone_drop_path = backbone_drop_path or not self.frozen_backbone
        keep = {id(p) for p in self.head_parameters()}
        for p in self.parameters():
            p.requires_grad_(not self.frozen_backbone or id(p) in keep)
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if mode and not self.backbone_drop_path:
            self.blocks.eval()  # the only train-mode behaviour in the backbone is drop-path
        return self

    # --- backbone ------------------------------------------------------------------------------
    def pos_embed_at(self, H, W):
        """Position embedding for an H x W image: [1, K + (H//p)(W//p), D] (see the module docstring)."""
        K, g, D = self.num_classes, self.grid, self.embed_dim
        gh, gw = H // self.patch_size, W // self.patch_size
        if gh * gw == g * g and H == W:
            return self.pos_embed
        patch = self.pos_embed[:, K:].reshape(1, g, g, D).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic",
                              align_corners=False)
        if patch.shape[-2:] != (gh, gw):  # the +0.1 keeps floor(g * scale) at the grid; fail loudly if not
            raise RuntimeError(f"position resize gave {tuple(patch.shape[-2:])}, expected {(gh, gw)}")
        return torch.cat([self.pos_embed[:, :K], patch.permute(0, 2, 3, 1).reshape(1, gh * gw, D)], dim=1)

    def forward_features(self, x, keep_tokens=False):
        """Runs the transformer. Returns a dict: 'cls' [B, K, D] and 'patch' [B, P, D] (last-block output, no
        final norm), 'attn' (L x [B, Hd, N, N] softmax weights), 'feats' (L x [B, N, D] attention-branch outputs
        after proj); with keep_tokens also 'tokens' (L+1 x [B, N, D]: the input sequence, then every block's)."""
        H, W = x.shape[-2:]
        if H < self.patch_size or W < self.patch_size:
            raise ValueError(f"image {H}x{W} is smaller than one {self.patch_size}-pixel patch")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            t = self.patch_embed(x)
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed_at(H, W)
            tokens, attns, feats = [t], [], []
            for blk in self.blocks:
                t, a, o = blk(t)
                attns.append(a)
                feats.append(o)
                if keep_tokens:
                    tokens.append(t)
        K = self.num_classes
        out = dict(cls=t[:, :K], patch=t[:, K:], attn=attns, feats=feats)
        if keep_tokens:
            out["tokens"] = tokens
        return out

    def fuse(self, attns, feats):
        """The adaptive attention fusion on detached inputs -> (fused [B, N, N], weights [B, L*Hd]).
        Channel c = head*L + layer; the features of map (head j, layer l) are channels j, j+Hd, ... of
        block l's attention-branch output."""
        Hd = self.num_heads
        maps = torch.stack([a.detach() for a in attns], dim=2).flatten(1, 2)  # [B, Hd, L, N, N] -> [B, Hd*L, N, N]
        f = torch.stack([o.detach() for o in feats], dim=1)  # [B, L, N, D]
        B, L, N, D = f.shape
        f = f.reshape(B, L, N, D // Hd, Hd).permute(0, 4, 1, 2, 3).reshape(B, Hd * L, N, D // Hd)
        return self.adaptive_attention_fusion(f, maps)

    # --- heads ---------------------------------------------------------------------------------
    def forward_all(self, x, keep_tokens=False):
        """Everything: forward_features' entries plus 'coarse' (head output, [B, K, h, w]), 'cls_logits',
        'coarse_logits', 'fine_logits' [B, K], 'fusion_weights' [B, L*Hd], 'fused' [B, N, N],
        'class_attn' [B, K, h, w], 'affinity' [B, P, P], 'cams' (class attention x relu(coarse)) and
        'fine_cam' [B, K, h, w]."""
        B, _, H, W = x.shape
        K, gh, gw = self.num_classes, H // self.patch_size, W // self.patch_size
        out = self.forward_features(x, keep_tokens)
        patch = out["patch"].detach() if self.frozen_backbone else out["patch"]
        coarse = self.head(patch.transpose(1, 2).reshape(B, self.embed_dim, gh, gw))
        fused, weights = self.fuse(out["attn"], out["feats"])
        class_attn = fused[:, :K, K:].reshape(B, K, gh, gw)
        affinity = fused[:, K:, K:]
        # WeakTr detaches the coarse CAM here (the fine loss trains only the fusion); the release's head-only
        # stages do not (losses on the fine CAM reach the head).
        cams = class_attn * F.relu(coarse if self.frozen_backbone else coarse.detach())
        fine = torch.einsum("bij,bkj->bki", affinity, cams.flatten(2)).reshape(B, K, gh, gw)
        out.update(coarse=coarse, cls_logits=out["cls"].mean(-1), coarse_logits=coarse.mean((2, 3)),
                   fusion_weights=weights, fused=fused, class_attn=class_attn, affinity=affinity, cams=cams,
                   fine_cam=fine, fine_logits=fine.mean((2, 3)))
        return out

    def forward(self, x):
        o = self.forward_all(x)
        return o["cls_logits"], o["coarse_logits"], o["fine_logits"]

    def cams(self, x):
        """(fine CAM, coarse CAM = relu(head output)), [B, K, H//p, W//p] each."""
        o = self.forward_all(x)
        return o["fine_cam"], F.relu(o["coarse"])


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def _state_dict_of(obj, path, what):
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        found = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} holds {found}, not {what} (a state dict, or a dict with it under 'model')")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _check_keys(sd, expected, path, what):
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path} does not hold {what}: missing {len(missing)} keys {missing[:4]}, "
                         f"unexpected {len(unexpected)} keys {unexpected[:4]}")


def _check_shapes(sd, model_sd, path, what, model):
    for k, v in sd.items():
        if tuple(v.shape) != tuple(model_sd[k].shape):
            raise ValueError(f"{path} does not fit the model ({what}): {k} is {tuple(v.shape)}, the model's "
                             f"{tuple(model_sd[k].shape)} (model: width {model.embed_dim}, {model.depth} blocks, "
                             f"{model.num_heads} heads, patch {model.patch_size}, K={model.num_classes})")


def load_imagenet_deit(model, path):
    """Initialise `model`'s transformer from the DeiT authors' ImageNet file (e.g.
    deit_small_patch16_224-cd65a155.pth). The class token and its position are repeated for the K classes,
    head.* is dropped, the rest lands unchanged; the conv head and fusion keep their initialisation.
    Refuses (ValueError naming the file) a file that is unreadable, not a DeiT state dict, or of another
    architecture (width, depth, patch, MLP size). Returns the model."""
    what = (f"a DeiT ImageNet state dict (timm key names, width {model.embed_dim}, {model.depth} blocks, "
            f"patch {model.patch_size})")
    sd = _state_dict_of(read_torch_file(path, "--init", f"expected {what}"), path, what)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    target = model.state_dict()
    expected = [k for k in target if not k.startswith(("head.", "adaptive_attention_fusion."))]
    _check_keys(sd, expected, path, what)
    D, K = model.embed_dim, model.num_classes
    cls, pos = sd["cls_token"], sd["pos_embed"]
    if cls.ndim != 3 or cls.shape[:2] != (1, 1) or cls.shape[2] != D:
        raise ValueError(f"{path}: cls_token is {tuple(cls.shape)}, expected (1, 1, {D}) for {what}")
    n = pos.shape[1] - 1 if pos.ndim == 3 else -1
    g = math.isqrt(n) if n > 0 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != D or g * g != n:
        raise ValueError(f"{path}: pos_embed is {tuple(pos.shape)}, expected (1, 1 + g*g, {D}) for {what}")
    patch_pos = pos[:, 1:]
    if g != model.grid:  # another training resolution: resize the patch positions as WeakTr's fine-tuning does
        patch_pos = F.interpolate(patch_pos.reshape(1, g, g, D).permute(0, 3, 1, 2), size=(model.grid,) * 2,
                                  mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, D)
    sd["cls_token"] = cls.repeat(1, K, 1)
    sd["pos_embed"] = torch.cat([pos[:, :1].repeat(1, K, 1), patch_pos], dim=1)
    _check_shapes(sd, target, path, what, model)
    model.load_state_dict(sd, strict=False)  # strict on the backbone above; head and fusion stay as they are
    return model


def save_weaktr_checkpoint(model, path, epoch=None, **extra):
    """Write WeakTr's CAM checkpoint format: {'model': state_dict, 'epoch': epoch, **extra}."""
    torch.save({"model": model.state_dict(), "epoch": epoch, **extra}, path)


def deit_config_from_state_dict(sd, pool="max", drop_path_rate=0.1):
    """DeiTS constructor arguments that fit a WeakTr-format state dict (the pool type and drop-path rate are
    not in the file). The number of heads is read off the fusion (L*Hd maps)."""
    K, D = sd["cls_token"].shape[1:]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - K)
    maps = sd["adaptive_attention_fusion.attn_head_ffn.0.weight"].shape[1]
    heads = maps // depth
    hidden = sd["adaptive_attention_fusion.attn_head_ffn.0.weight"].shape[0]
    feat_hidden = sd["adaptive_attention_fusion.attn_feat_ffn.0.weight"].shape[0]
    return dict(num_classes=int(K), img_size=grid * patch, patch_size=patch, embed_dim=int(D), depth=depth,
                num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
                drop_path_rate=drop_path_rate, reduction=maps / hidden, feat_reduction=(D // heads) / feat_hidden,
                pool=pool)


def is_weaktr(obj):
    """Whether a file's dict looks like a WeakTr CAM checkpoint (a state dict with the fusion, under 'model')."""
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    return isinstance(sd, dict) and any(str(k).endswith("adaptive_attention_fusion.attn_head_ffn.0.weight") for k in sd)


def load_weaktr_checkpoint(path, model=None, pool="max", obj=None):
    """Load a WeakTr-format CAM checkpoint ({'model': state_dict, ...}) into `model`, or, with model=None,
    into a new DeiTS built to fit it (pool type as given). Strict: every key and shape must match (ValueError
    naming the file otherwise). `obj`: the file's dict, if already read. Returns (model, the file's dict)."""
    what = "a WeakTr CAM checkpoint (DeiT with K class tokens, conv head, adaptive_attention_fusion)"
    if obj is None:
        obj = read_torch_file(path, "--init", f"expected {what}")
    sd = _state_dict_of(obj, path, what)
    if model is None:
        needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight",
                  "adaptive_attention_fusion.attn_head_ffn.0.weight",
                  "adaptive_attention_fusion.attn_feat_ffn.0.weight"]
        missing = [k for k in needed if k not in sd]
        if missing:
            raise ValueError(f"{path} does not hold {what}: missing {missing}")
        model = DeiTS(**deit_config_from_state_dict(sd, pool))
    target = model.state_dict()
    _check_keys(sd, list(target), path, what)
    _check_shapes(sd, target, path, what, model)
    model.load_state_dict(sd)
    return model, obj
