"""The mask generator S: a backbone (a dilated torchvision ResNet, or a tiny one for the toy world), a 1x1
classifier, one class activation map per class, and optional category clusters (arXiv 2412.13823)."""
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

from semples.runtime import load_checkpoint, read_torch_file

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
    """Rebuild S from a finished stage checkpoint alone (the architecture is in the checkpoint's args); with
    `class_names`, refuse a checkpoint trained for other classes (names and order, not only the count)."""
    ckpt = load_checkpoint(path, "mask_generator", flag, finished=True)
    if class_names is not None and ckpt["class_names"] != list(class_names):
        raise ValueError(f"{flag} {path} was trained for classes {ckpt['class_names'][:4]}... "
                         f"({ckpt['num_classes']}), the dataset has {list(class_names)[:4]}... ({len(class_names)})")
    a = ckpt["args"]
    S = MaskGenerator(a["backbone"], ckpt["num_classes"], a["output_stride"], ckpt.get("clusters"))
    S.load_state_dict(ckpt["model"])
    return S.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------
