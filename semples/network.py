"""The mask generator S, either of two families:
* a CAM network (CLIMS's): a backbone (a dilated torchvision ResNet, or a tiny one for the toy world), a 1x1
  classifier, one class activation map per class, and optional category clusters (arXiv 2412.13823);
* WeakTr's DeiT-S (the paper's S; semples/deit.py): K class tokens, a 3x3 conv head, the adaptive attention
  fusion; its CAM is the fine CAM. `deit_toy` is the same design, small, for the toy world on CPU.
Both take images in [0, 1] and return CAMs [B, K, h, w]; a stage rebuilds S from a checkpoint alone."""
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

from semples import deit
from semples.runtime import check_checkpoint, read_torch_file

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNETS = ("resnet50", "resnet101", "resnet18", "resnet34", "tiny")
# WeakTr's DeiT-S, and a small one of the same design for the toy world's 96 px images on CPU: 8 px patches
# (a 12 x 12 grid, as fine as the tiny ResNet's stride 8), 4 blocks of width 96 with 4 heads (16 attention maps).
DEITS = {"deit_s": deit.DEIT_S,
         "deit_toy": dict(deit.DEIT_S, img_size=96, patch_size=8, embed_dim=96, depth=4, num_heads=4)}
BACKBONES = RESNETS + tuple(DEITS)



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
    if name not in RESNETS:
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

    def head_parameters(self):
        """The 1x1 classifier(s): what --train head trains (train_cam.py's --head_lr_mult applies to them)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

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


class DeiTMaskGenerator(nn.Module):
    """S as WeakTr's DeiT (semples/deit.py): image in [0, 1] -> fine CAM [B, K, H/p, W/p] (>= 0), the map every
    stage turns into masks; forward(x, logits=True) -> the three [B, K] logits (class tokens, coarse CAM, fine
    CAM) that train_cam.py's three soft-margin losses train. `self.net` is WeakTr's module, key for key."""

    def __init__(self, backbone, num_classes, clusters=None):
        super().__init__()
        if clusters:
            raise ValueError(f"--clusters works with the ResNet CAM networks only, not --backbone {backbone}")
        self.clusters = None
        self.net = deit.DeiTS(num_classes, **DEITS[backbone])
        self.net.norm.requires_grad_(False)  # never applied (as WeakTr): no gradient, and DDP must not wait for one
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def frozen_backbone(self):
        return self.net.frozen_backbone

    def head_parameters(self):
        """The conv head and the fusion: what --train head trains (the release's stages a and c)."""
        return self.net.head_parameters()

    def set_trainable(self, part):
        """'all' (WeakTr's CAM training) or 'head' (stages a, c: the transformer fixed, in eval mode)."""
        self.net.set_trainable(part)
        self.net.norm.requires_grad_(False)
        return self

    def forward(self, x, logits=False, cluster_maps=False):
        if cluster_maps:
            raise ValueError("this S has no clusters (train_cam.py --clusters, ResNet backbones only)")
        x = (x - self.mean) / self.std
        return self.net(x) if logits else self.net.forward_all(x)["fine_cam"]


def new_mask_generator(backbone, num_classes, output_stride=16, clusters=None):
    """An untrained S of either family."""
    if backbone in DEITS:
        return DeiTMaskGenerator(backbone, num_classes, clusters)
    return MaskGenerator(backbone, num_classes, output_stride, clusters)


def mask_style(backbone, stage):
    """How masked_pairs turns S's CAMs into soft masks, as the authors' release does for each S: DeiT's fine
    CAM (a 14 x 14 grid at 224) resized with align_corners=True and min-max normalised with eps 0.1 in stages (a)
    and (c) (so a map whose range is below ~0.1 stays dim instead of being stretched to 1) and 1e-4 in (b);
    the ResNet CAMs (CLIMS's) with align_corners=False and eps 1e-5."""
    if backbone in DEITS:
        return dict(align_corners=True, eps=1e-4 if stage == "prompt" else 0.1)
    return dict(align_corners=False, eps=1e-5)


def build_mask_generator(backbone, num_classes, output_stride, init=None, clusters=None):
    """A fresh S for train_cam.py; `init` is an ImageNet file or None (random init, fine for the toy world):
    torchvision's ResNet state dict (backbone only), or for deit_s the DeiT authors' ImageNet file (class token
    and position repeated per class, the 1000-way head dropped; semples/deit.py); `clusters` a list of
    class-index lists, or None."""
    S = new_mask_generator(backbone, num_classes, output_stride, clusters)
    if not init:
        return S
    if backbone in DEITS:
        deit.load_imagenet_deit(S.net, init)
        return S
    obj = read_torch_file(init, "--init", "pass an ImageNet torchvision state-dict file, or nothing (random init)")
    if not (isinstance(obj, dict) and "conv1.weight" in obj):
        raise ValueError(f"--init {init} is not a torchvision ImageNet state dict (expected keys like "
                         "'conv1.weight')")
    load_imagenet_backbone(S.backbone, obj, init, backbone)
    return S


def from_weaktr(obj, path, class_names):
    """A WeakTr CAM checkpoint ({'model': state dict}, hustvl/WeakTr's release) as our stage checkpoint of a
    finished deit_s S at 224 px, for the dataset's classes (the file has no names: its class count must match)."""
    if class_names is None:
        raise ValueError(f"{path} is a WeakTr checkpoint: it needs the dataset's class names")
    S = DeiTMaskGenerator("deit_s", len(class_names))
    deit.load_weaktr_checkpoint(path, S.net, obj=obj)
    return {"kind": "mask_generator", "stage": "weaktr", "model": S.state_dict(), "epoch": obj.get("epoch"),
            "done": True, "num_classes": len(class_names), "class_names": list(class_names), "clusters": None,
            "args": {"backbone": "deit_s", "output_stride": 16, "size": deit.DEIT_S["img_size"], "weaktr": path}}


def load_mask_generator(path, device, flag="--checkpoint", class_names=None):
    """Rebuild S from a finished stage checkpoint alone (the architecture is in the checkpoint's args), or from
    a WeakTr CAM checkpoint (from_weaktr: stage (a) may start from WeakTr's released CAM network, as the
    authors' release does); with `class_names`, refuse a checkpoint trained for other classes (names and order,
    not only the count)."""
    obj = read_torch_file(path, flag, "run the stage that writes it first (see README), or point the flag at an "
                                      "existing checkpoint")
    if isinstance(obj, dict) and "kind" not in obj and deit.is_weaktr(obj):
        ckpt = from_weaktr(obj, path, class_names)
    else:
        ckpt = check_checkpoint(obj, path, "mask_generator", flag, finished=True)
    if class_names is not None and ckpt["class_names"] != list(class_names):
        raise ValueError(f"{flag} {path} was trained for classes {ckpt['class_names'][:4]}... "
                         f"({ckpt['num_classes']}), the dataset has {list(class_names)[:4]}... ({len(class_names)})")
    a = ckpt["args"]
    S = new_mask_generator(a["backbone"], ckpt["num_classes"], a["output_stride"], ckpt.get("clusters"))
    S.load_state_dict(ckpt["model"])
    return S.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------
