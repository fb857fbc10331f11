"""The standard WSSS evaluation: train a DeepLab-v2 segmenter on the pseudo masks, then predict val.

DeepLab-v2 (the recipe of docs/method.md, "The standard evaluation"): ResNet-101 dilated to output stride 8,
ASPP = four parallel 3x3 convolutions with rates 6/12/18/24 whose outputs are summed (no BN in the
head), K+1 outputs (background included). Random scale 0.5-1.5, random crop (pad: mean pixel / ignore
255), horizontal flip; SGD momentum 0.9, weight decay 5e-4, lr 2.5e-4 with 10x (weights) / 20x (biases)
on the ASPP head as in DeepLab's release, poly 0.9, batch 10, 20k iterations; backbone BatchNorm frozen
(ImageNet statistics, the batch is too small). Test: multi-scale + flip, softmax averaged, optional
dense CRF. The last checkpoint is the result: nothing here selects with ground truth.

Toy world (CPU, about 2 minutes; --masks data/toy/SegmentationClass for the ground-truth upper bound):
    python train_seg.py --dataset toy --device cpu
Paper, VOC (one GPU; `torchrun --nproc_per_node 4 train_seg.py ...` for four):
    python train_seg.py --dataset voc --init data/resnet101-imagenet.pth --masks out/voc/pseudo/masks --crf
Predict again with a finished segmenter (e.g. with CRF or other scales; OUT/pred is rewritten):
    python train_seg.py --dataset voc --checkpoint out/voc/seg/checkpoint.pt --crf --out out/voc/seg_crf

Writes OUT/checkpoint.pt (20 times a run, resumed from if present; `num_classes` is the
foreground count K, the network has K+1 outputs), OUT/pred/{id}.png (VOC palette, what eval_miou.py
scores), OUT/log.txt (one `iter ...` line every 100 iterations, then `mIoU: xx.xx`), OUT/args.json.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from semples import datasets, presets, runtime, train_loop
from semples.cams import dense_crf
from semples.metrics import confusion_matrix, default_gt_dir, miou_from_confusion
from semples.network import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, build_backbone, load_imagenet_backbone

PRESETS = presets.of("train_seg")
# Dense CRF of the segmenter's test (DeepLab-v2's VOC setting as in deeplab-pytorch, which WSSS papers reuse);
# the pseudo-mask CRF of make_pseudo.py (cams.CRF_DEFAULTS) uses other parameters.
SEG_CRF = dict(gauss_sxy=1, gauss_compat=3, bi_sxy=67, bi_srgb=3, bi_compat=4, iters=10)
POLY_POWER = 0.9  # lr = base lr * (1 - iteration / iterations) ** POLY_POWER
ASPP_RATES = (6, 12, 18, 24)  # dilation rates of the four ASPP branches
SCALE_RANGE = (0.5, 1.5)  # random rescale range of the training images
# Flags that shape no trained weight: a resumed run may differ in these (runtime.check_resume checks the rest).
RESUME_FREE = ("checkpoint", "eval_split", "test_scales", "crf", "stop_after")
MOMENTUM = 0.9  # SGD momentum (DeepLab's)
LOG_EVERY = 100  # iterations per log line
CHECKPOINTS = 20  # checkpoints a run writes (every iters / 20 iterations): a kill loses at most 5% of the run


def build_parser():
    p = runtime.new_parser(__doc__)
    runtime.add_common_flags(p)
    p.add_argument("--masks", type=str, default=None,
                   help="training masks: folder of {id}.png class-index PNGs, 255 ignored (pseudo masks, or "
                        "the ground-truth folder for an upper bound)")
    p.add_argument("--split", type=str, default="train_aug", help="image list the segmenter trains on")
    p.add_argument("--eval_split", type=str, default="val", help="image list predicted (and scored) at the end")
    p.add_argument("--out", type=str, default=None, help="output folder")
    p.add_argument("--init", type=str, default=None,
                   help="ImageNet torchvision state-dict file for the backbone (fc dropped); none = random")
    p.add_argument("--backbone", type=str, default="resnet101", choices=BACKBONES, help="segmenter backbone")
    p.add_argument("--output_stride", type=int, default=8, choices=(8, 16, 32),
                   help="backbone output stride (8 in DeepLab-v2)")
    p.add_argument("--freeze_bn", action=argparse.BooleanOptionalAction, default=True,
                   help="keep backbone BatchNorm in eval mode with frozen affine (DeepLab-v2 with ImageNet init)")
    p.add_argument("--crop", type=runtime.positive_int, default=321, help="training crop size (square)")
    p.add_argument("--batch_size", type=runtime.positive_int, default=10, help="images per iteration, summed over GPUs")
    p.add_argument("--iters", type=runtime.positive_int, default=20000, help="training iterations")
    p.add_argument("--lr", type=runtime.positive_float, default=2.5e-4, help="SGD lr of the backbone (poly 0.9 decay)")
    p.add_argument("--head_lr_mult", type=runtime.positive_float, default=10.0,
                   help="lr multiplier of the ASPP weights (its biases get twice this)")
    p.add_argument("--weight_decay", type=runtime.nonnegative_float, default=5e-4, help="SGD weight decay")
    p.add_argument("--stop_after", type=runtime.nonnegative_int, default=0,
                   help="stop (checkpoint saved) after this many iterations in total, schedule unchanged, "
                        "as if killed; rerun to continue (for time-limited jobs); 0 = off")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoint.pt if present (refused if result-shaping flags changed); "
                        "--no-resume removes it and starts afresh")
    p.add_argument("--checkpoint", type=str, default=None,
                   help="a finished segmenter: skip training, predict (and score) --eval_split with it")
    p.add_argument("--test_scales", type=runtime.float_list, default="0.5,0.75,1.0,1.25",
                   help="comma list of inference scales")
    p.add_argument("--crf", action="store_true",
                   help="dense CRF (SEG_CRF parameters) on the averaged probabilities, via cams.dense_crf")
    return p


# ----------------------------------------------------------------------------------------------
# DeepLab-v2
# ----------------------------------------------------------------------------------------------
class DeepLabV2(nn.Module):
    """Image in [0, 1] -> logits [B, K+1, H/8, W/8]: dilated ResNet, then the sum of four 3x3 atrous convs."""

    def __init__(self, backbone, num_outputs, output_stride=8, rates=ASPP_RATES, freeze_bn=False):
        super().__init__()
        self.backbone, channels = build_backbone(backbone, output_stride)
        self.aspp = nn.ModuleList(nn.Conv2d(channels, num_outputs, 3, padding=r, dilation=r) for r in rates)
        for conv in self.aspp:  # DeepLab-v2's init of the classifier
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x):
        f = self.backbone((x - self.mean) / self.std)
        return sum(conv(f) for conv in self.aspp)


def build_segmenter(a, num_outputs):
    """The network from an args dict (this run's, or a checkpoint's)."""
    return DeepLabV2(a["backbone"], num_outputs, a["output_stride"], ASPP_RATES, a["freeze_bn"])


def load_imagenet(net, path, backbone):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init {path} not found: pass a torchvision ImageNet state-dict file or nothing")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "conv1.weight" not in obj:
        raise ValueError(f"--init {path} is not a torchvision ImageNet state dict (expected keys like 'conv1.weight')")
    load_imagenet_backbone(net.backbone, obj, path, backbone)


# ----------------------------------------------------------------------------------------------
# Data: (image, mask) crops; every random draw seeded by (seed, iteration, index) so resume is exact
# ----------------------------------------------------------------------------------------------
def check_masks(folder, ids):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--masks folder {folder} not found: run make_pseudo.py first, or point --masks "
                                "at a folder of {id}.png masks (e.g. the ground truth, for an upper bound)")
    missing = [i for i in ids if not os.path.exists(os.path.join(folder, f"{i}.png"))]
    if missing:
        raise FileNotFoundError(f"--masks {folder} lacks {len(missing)} of {len(ids)} masks, first "
                                f"{os.path.join(folder, missing[0] + '.png')}")


class SegDataset(torch.utils.data.Dataset):
    """Keys are (index, iteration). Returns float image [3, crop, crop] in [0, 1] and long mask (255 ignore)."""

    def __init__(self, root, split, masks, num_outputs, crop, scale_range, seed):
        self.root, self.masks, self.K1, self.crop, self.scales = root, masks, num_outputs, crop, scale_range
        self.seed = seed
        self.ids = datasets.read_ids(root, split)
        check_masks(masks, self.ids)
        self.key = datasets.data_key(root, self.ids, masks=masks)  # images and training masks, for resume
        self.pad = np.array(IMAGENET_MEAN, np.float32) * 255

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        n, step = key
        i = self.ids[n]
        img = datasets.read_image(datasets.image_path(self.root, i))
        path = os.path.join(self.masks, f"{i}.png")
        mask = datasets.read_mask(path)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image {img.shape[1]}x{img.shape[0]}")
        bad = mask[(mask >= self.K1) & (mask != 255)]
        if bad.size:
            raise ValueError(f"mask {path} holds class {int(bad.max())}; the dataset has classes 0..{self.K1 - 1} "
                             "(and 255 = ignore)")
        rng = np.random.default_rng([self.seed, step, n])
        s = rng.uniform(*self.scales)
        h, w = max(1, round(img.shape[0] * s)), max(1, round(img.shape[1] * s))
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR), np.float32)
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        H, W = max(h, self.crop), max(w, self.crop)
        canvas, target = np.empty((H, W, 3), np.float32), np.full((H, W), 255, np.uint8)
        canvas[:] = self.pad
        canvas[:h, :w], target[:h, :w] = img, mask
        y0, x0 = rng.integers(0, H - self.crop + 1), rng.integers(0, W - self.crop + 1)
        canvas = canvas[y0:y0 + self.crop, x0:x0 + self.crop]
        target = target[y0:y0 + self.crop, x0:x0 + self.crop]
        if rng.random() < 0.5:
            canvas, target = canvas[:, ::-1], target[:, ::-1]
        x = torch.from_numpy(canvas.copy()).permute(2, 0, 1) / 255
        return x, torch.from_numpy(target.astype(np.int64))


class StepBatches(torch.utils.data.Sampler):
    """Batches of (index, iteration) for iterations start..iters-1: a fresh permutation per pass over the
    data (seeded by (seed, pass)); each process takes its share of the global batch (runtime.rank_share), so
    that the processes together train on exactly the batches of one process."""

    def __init__(self, n, batch, start, iters, seed, rank, world):
        self.n, self.batch, self.start, self.iters, self.seed = n, batch, start, iters, seed
        self.mine = slice(*runtime.rank_share(batch, rank, world))
        self.per_pass = n // batch

    def __len__(self):
        return self.iters - self.start

    def __iter__(self):
        for step in range(self.start, self.iters):
            perm = np.random.default_rng([self.seed, step // self.per_pass]).permutation(self.n)
            j = (step % self.per_pass) * self.batch
            yield [(int(n), step) for n in perm[j:j + self.batch][self.mine]]


# ----------------------------------------------------------------------------------------------
# Inference: multi-scale + flip, softmax averaged, optional CRF
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_probs(net, image, scales, device, amp):
    """image uint8 HxWx3 -> class probabilities [K+1, H, W] (float32, CPU): the softmax averaged over the scales
    and the horizontal flip of each."""
    H, W = image.shape[:2]
    x = torch.from_numpy(image.copy()).to(device).permute(2, 0, 1)[None].float() / 255
    total = 0
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, size=(max(1, round(H * s)), max(1, round(W * s))),
                                            mode="bilinear", align_corners=False)
        with runtime.autocast(device, amp):
            logits = net(torch.cat([xs, xs.flip(-1)]))
        p = F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False).softmax(1)
        total = total + p[0] + p[1].flip(-1)
    return (total / (2 * len(scales))).cpu()


def evaluate(net, args, names, device, rank, world, log):
    """Write OUT/pred/{id}.png for the ids of --eval_split (split over processes); score them if the
    ground truth is there. Returns the mIoU (percent) or None."""
    ids = datasets.read_ids(args.data, args.eval_split)
    gt_dir = default_gt_dir(args.data, ids)  # the one eval_miou.py scores against
    have_gt = all(os.path.exists(os.path.join(gt_dir, f"{i}.png")) for i in ids)
    K1 = len(names) + 1
    pred_dir = os.path.join(args.out, "pred")
    scales = args.test_scales
    net.eval()
    conf = np.zeros((K1, K1), np.int64)
    mine = ids[rank::world]
    loader = torch.utils.data.DataLoader(datasets.ImageList(args.data, mine), batch_size=None,
                                         num_workers=args.workers)
    t0 = time.time()
    for image, n in runtime.progress(loader, f"predict {args.eval_split}", rank == 0):
        image, i = image.numpy(), mine[n]
        probs = predict_probs(net, image, scales, device, args.amp)
        if args.crf:
            pred = dense_crf(image, probs.numpy(), **SEG_CRF)  # probability unaries (-log p)
        else:
            pred = probs.argmax(0).numpy()
        pred = np.asarray(pred, np.uint8)
        datasets.save_mask(os.path.join(pred_dir, f"{i}.png"), pred)
        if have_gt:
            gt_path = os.path.join(gt_dir, f"{i}.png")
            conf += confusion_matrix(datasets.read_mask(gt_path), pred, K1, where=gt_path)
    if world > 1:
        t = torch.from_numpy(conf).to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        conf = t.cpu().numpy()
    log(f"predicted {len(ids)} '{args.eval_split}' images -> {pred_dir} (scales {scales} with flips, "
        f"crf {args.crf}) time {time.time() - t0:.1f}s")
    if not have_gt:
        log(f"no ground truth for every '{args.eval_split}' id in {gt_dir}: not scored")
        return None
    miou, ious = miou_from_confusion(conf)  # fractions; nan = class absent from gt and pred
    log("IoU " + " ".join(f"{n}={'n/a' if np.isnan(v) else f'{100 * v:.1f}'}"
                          for n, v in zip(["background"] + names, ious)))
    miou = 100 * miou
    log(f"mIoU: {miou:.2f}")
    return miou


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args):
    device, rank, world, log, ckpt_path, names = train_loop.begin(args)
    K = len(names)

    if args.checkpoint:
        path = args.checkpoint
        ckpt = runtime.load_checkpoint(path, "segmenter", "--checkpoint", finished=True)
        if ckpt["num_classes"] != K:
            raise ValueError(f"--checkpoint {path} was trained for {ckpt['num_classes']} foreground classes "
                             f"{ckpt['class_names'][:3]}..., the dataset {args.data} has {K} {names[:3]}...")
        net = build_segmenter(ckpt["args"], K + 1).to(device)
        net.load_state_dict(ckpt["model"])
        miou = evaluate(net, args, names, device, rank, world, log)
        runtime.cleanup_distributed()
        return miou

    runtime.rank_share(args.batch_size, rank, world)  # before reading data: refuses more processes than images
    data = SegDataset(args.data, args.split, args.masks, K + 1, args.crop, SCALE_RANGE, args.seed)
    args.data_key = data.key  # resume only on the same images and masks
    if len(data) < args.batch_size:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the {len(data)} images of '{args.split}'")
    net = build_segmenter(vars(args), K + 1)
    if args.init:
        load_imagenet(net, args.init, args.backbone)
    elif args.freeze_bn and args.backbone != "tiny":  # frozen random statistics: a ResNet-101's activations blow up
        raise ValueError("--freeze_bn keeps the backbone's BatchNorm statistics fixed, which needs ImageNet weights: "
                         "pass --init FILE (run.sh: --seg_init; README 'Data'), or --no-freeze_bn to train from "
                         "random weights")
    net = net.to(device)
    head_w = [c.weight for c in net.aspp]
    head_b = [c.bias for c in net.aspp]
    body = [p for p in net.backbone.parameters() if p.requires_grad]
    mults = [1.0, args.head_lr_mult, 2 * args.head_lr_mult]
    opt = torch.optim.SGD([{"params": body}, {"params": head_w}, {"params": head_b}], lr=args.lr,
                          momentum=MOMENTUM, weight_decay=args.weight_decay)

    start = 0
    ckpt = runtime.resume_or_start(args, ckpt_path, "segmenter", log, rank, RESUME_FREE)
    if ckpt is not None:
        if ckpt["num_classes"] != K:
            raise ValueError(f"{ckpt_path} has {ckpt['num_classes']} classes, the dataset {K}; use a new --out")
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["iter"]
        if start > args.iters:
            raise ValueError(f"{ckpt_path} is at iteration {start}, past --iters {args.iters}; use a new --out")
        log(f"resumed from {ckpt_path} at iteration {start}/{args.iters}")
    model = net
    if world > 1:
        if device.type == "cuda" and not args.freeze_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(it):
        if rank == 0:
            runtime.save_checkpoint({"kind": "segmenter", "model": net.state_dict(), "optimizer": opt.state_dict(),
                                    "iter": it, "iters": args.iters, "done": it == args.iters, "num_classes": K,
                                    "class_names": names, "args": vars(args)}, ckpt_path)

    end = min(args.iters, args.stop_after) if args.stop_after else args.iters
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=StepBatches(len(data), args.batch_size, start, end, args.seed, rank, world),
        num_workers=args.workers, pin_memory=device.type == "cuda")
    model.train()
    loss_sum, n_sum, t0 = 0.0, 0, time.time()
    it = start
    for it, (x, target) in enumerate(runtime.progress(loader, "train", rank == 0, total=end - start), start + 1):
        for g, m in zip(opt.param_groups, mults):
            g["lr"] = runtime.poly_lr(args.lr * m, it - 1, args.iters, POLY_POWER)
        x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
        # ---------------- algorithm logic ----------------
        with runtime.autocast(device, args.amp):
            logits = model(x)
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, target, ignore_index=255)  # a mean over the labelled pixels
        # --------------------------------------------------
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it}; lower --lr")
        loss = loss * runtime.global_mean_weight(int((target != 255).sum()), world)  # this process's share
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum, n_sum = loss_sum + loss.item(), n_sum + 1
        if it % LOG_EVERY == 0 or it == end:
            log(f"iter {it}/{args.iters} loss {runtime.all_reduce_mean(loss_sum / n_sum, world):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} time {time.time() - t0:.1f}s")
            loss_sum, n_sum = 0.0, 0
        if it % max(1, args.iters // CHECKPOINTS) == 0 or it == end:
            save(it)
    if end < args.iters:
        log(f"stopped at iteration {end}/{args.iters} (--stop_after); rerun to continue")
        runtime.cleanup_distributed()
        return None
    log(f"done: {ckpt_path}")
    miou = evaluate(net, args, names, device, rank, world, log)
    runtime.cleanup_distributed()
    return miou


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
