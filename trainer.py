"""The one training loop for the mask generator S, shared by train_cam.py (the CAM network),
train_match.py (stage a) and train_refine.py (stage c). A stage hands it its objective,
`objective(x, y, cams) -> (loss, {name: term})`, a mean over the batch's images or (image, class) pairs;
everything else is here: data, S, the optimizer and its cosine, DDP (any process count trains on the
1-process batches with the 1-process gradient), bf16 autocast, resume, checkpoints and the epoch line
in OUT/log.txt.

Nothing in this file decides what S learns: read the stage files for that.
"""
import argparse
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from semples import FILLS, load_mask_generator


# The per-dataset values stages (a) and (c) share, kept in one place so that `train_refine.py --lambda_refine 0`
# is stage (a)'s objective and schedule. Toy: lr, lambda_area and epochs from sweeps on the toy world (docs/method.md,
# "The toy presets"): at the paper's scaled lr the 1x1 head barely moves; at 0.03-0.1 without the area term it finds
# wrong masks; 20 epochs instead of 6 take stage (a) from +1.6 to +2.3 seed mIoU over the CAM network (3 seeds);
# lambda_b 1.2 (paper: 2.4 VOC, 0.75 COCO): the toy CLIP scores a background image 0.2-0.5 with its class text, far
# above real CLIP's scale, so the background term weighs more than on VOC. Stage (a) over the CAM network went from
# +2.31 / +1.66 / +1.81 to +2.70 / +2.23 / +3.42 seed mIoU on three toy worlds (3 seeds each); second world, stage
# (a) seed mIoU at lambda_b 1.2 / 2.4 / 4.8: 61.4 / 60.8 / 54.2.
# cache_features: the frozen backbone runs once per (image, flip), not once per epoch (stage (a) 225 s -> 152 s).
MATCHING_PRESETS = {"coco": dict(lambda_b=0.75, lr=5e-6),
                    "toy": dict(batch_size=32, epochs=20, lr=0.05, lambda_b=1.2, lambda_area=0.75, workers=1,
                                cache_features=True)}
# Stage (c)'s lambda, the weight of L_refine, per dataset: VOC the paper's (train_refine.py's flag default), COCO
# the paper's, toy from sweeps (docs/method.md): 0.8 against 1.6 and 4 on all three toy worlds gave as good seeds,
# and 0.8 alone kept SemPLeS's pseudo masks level with stage (a)'s, the larger weights trimming boat's thin sail.
# train_refine.py's presets and ablate.py's "all" row both read it here.
LAMBDA_REFINE = {"voc": 0.05, "coco": 0.2, "toy": 0.8}


def add_flags(p, epochs, lr, batch_size, matching=False):
    """Flags every S-training stage has; defaults are the paper's VOC values for that stage. `matching`
    adds those of stages (a) and (c), which both train S against the frozen CLIP."""
    common.add_common_flags(p)
    p.add_argument("--split", type=str, default="train_aug", help="image list S trains on")
    p.add_argument("--out", type=str, default=None, help="output folder")
    p.add_argument("--batch_size", type=common.positive_int, default=batch_size,
                   help="images per step, summed over GPUs")
    p.add_argument("--epochs", type=common.positive_int, default=epochs, help="training epochs")
    p.add_argument("--lr", type=common.positive_float, default=lr,
                   help="AdamW lr before scaling by batch/512, as in the authors' release (cosine, no warm-up); "
                        "train_cam.py --optimizer sgd uses it as given (poly)")
    p.add_argument("--weight_decay", type=common.nonnegative_float, default=0.03, help="weight decay")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoint.pt if present (refused if result-shaping flags changed); "
                        "--no-resume removes it and starts afresh")
    if matching:
        p.add_argument("--clip", type=str, default=None, help="CLIP model name (e.g. ViT-B/32) or checkpoint path")
        p.add_argument("--init", type=str, default=None,
                       help="checkpoint of S to start from (stage a: the CAM network; stage c: stage (a)'s S)")
        p.add_argument("--train", type=str, default="head", choices=("head", "all"),
                       help="what of S trains: the 1x1 classifier on fixed features (the release), or everything")
        p.add_argument("--fill", type=str, default="mean", choices=FILLS,
                       help="masked-out pixels: CLIP's mean colour (the mask multiplies the normalised image, "
                            "as CLIMS and the release do) or black")
        p.add_argument("--lambda_b", type=common.nonnegative_float, default=2.4,
                       help="weight of the background term of L_match (Eq. 1)")
        p.add_argument("--lambda_area", type=common.nonnegative_float, default=0.0,
                       help="weight of CLIMS's area term mean(M), not in the paper (0 = off): it keeps M from "
                            "covering the whole image, L_match's trivial minimum")
        p.add_argument("--cache_features", action=argparse.BooleanOptionalAction, default=False,
                       help="with --train head (no effect with all): keep the fixed backbone features of each "
                            "(image, flip) in memory after their first use, so that later epochs run only the head "
                            "(the same training up to float rounding; memory: images x 2 x the feature map, 0.6 GB "
                            "on the toy world)")
    return p


# What an objective's mean is over, counted in a batch (x images, y multi-hot labels): the weight of each
# process's mean in the global one (common.global_mean_weight). One pair per present class (masked_pairs).
MEAN_OVER = {"images": lambda x, y: len(x), "pairs": lambda x, y: int(torch.count_nonzero(y))}


class GlobalBatches(torch.utils.data.Sampler):
    """This process's share of each global batch of `batch` images (common.rank_share). Every process draws
    the 1-process permutation of the epoch (DistributedSampler's: randperm seeded by seed + epoch), so the
    processes together train on exactly the batches one process would; a last partial batch is dropped."""

    def __init__(self, n, batch, rank, world, seed):
        self.n, self.batch, self.seed, self.epoch = n, batch, seed, 0
        self.start, self.stop = common.rank_share(batch, rank, world)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n // self.batch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for i in range(len(self)):
            yield order[i * self.batch:(i + 1) * self.batch][self.start:self.stop]


@torch.no_grad()
def cached_features(S, cache, x, index, data):
    """The frozen backbone's features of a batch: each (image, flip) is computed once and then read from
    `cache` (--cache_features). With --train head they never change, so this only skips repeated work; the
    backbone runs on other batches than without the cache, which can change float rounding."""
    keys = [(n, data.flipped(n)) for n in index.tolist()]
    new = [i for i, key in enumerate(keys) if key not in cache]
    if new:
        for i, f in zip(new, S.features(x[new])):
            cache[keys[i]] = f
    return torch.stack([cache[key] for key in keys])


def train(args, objective, stage, S=None, extra=None, extra_lr=None, cluster_maps=False, mean_over="images"):
    """Train S (built by the caller, or rebuilt from the --init checkpoint) with `objective` for
    args.epochs. `extra`: another module trained alongside S at `extra_lr` (the prompts, in joint
    training); saved in the checkpoint as "extra". `cluster_maps`: the objective gets (CAMs, cluster maps)
    instead of the CAMs. `mean_over`: what the objective's loss and terms are means over, "images" or
    "pairs" (MEAN_OVER). Writes OUT/checkpoint.pt every epoch; returns its path."""
    device, rank, world, log, ckpt_path, names = common.begin(args)
    K = len(names)
    if S is None:
        S, init = load_mask_generator(args.init, "cpu", "--init", names)
        for k in ("backbone", "output_stride", "size"):  # S keeps its architecture and input size
            setattr(args, k, init["args"][k])
    S.set_trainable(getattr(args, "train", "all"))
    S = S.to(device)
    # (image index, flipped) -> features of the frozen backbone; only a frozen backbone's features can be kept
    cache = {} if getattr(args, "cache_features", False) and S.frozen_backbone else None
    data = common.ClsDataset(args.data, args.split, K, args.size, augment=True, seed=args.seed)
    if data.left_out:
        log(data.note(args.split))
    sampler = GlobalBatches(len(data), args.batch_size, rank, world, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the {len(data)} images of '{args.split}'")
    sgd = getattr(args, "optimizer", "adamw") == "sgd"  # train_cam.py's VOC/COCO recipe (IRN's); else AdamW
    head = [p for n, p in S.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    body = [p for n, p in S.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    groups = [{"params": body, "lr_scale": 1.0}, {"params": head, "lr_scale": getattr(args, "head_lr_mult", 1.0)}]
    if extra is not None:
        extra = extra.to(device)
        groups.append({"params": list(extra.parameters()), "lr_scale": extra_lr / args.lr})
    groups = [g for g in groups if g["params"]]  # --train head: no backbone group
    opt = (torch.optim.SGD(groups, lr=0.0, weight_decay=args.weight_decay) if sgd else
           torch.optim.AdamW(groups, lr=0.0, weight_decay=args.weight_decay))

    start = 0
    ckpt = common.resume_or_start(args, ckpt_path, "mask_generator", log, rank, free=("cache_features",))
    if ckpt is not None:
        S.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if extra is not None:
            extra.load_state_dict(ckpt["extra"])
        start = ckpt["epoch"]
        log(f"resumed from {ckpt_path} at epoch {start}/{args.epochs}")
    model = S
    if world > 1:
        if device.type == "cuda":  # BatchNorm statistics of the global batch (SyncBatchNorm is GPU-only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(S)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # AdamW: the release's lr, scaled by batch/512, cosine. SGD: IRN's lr as given (0.1 at batch 16), poly 0.9.
    base_lr, steps = (args.lr if sgd else args.lr * args.batch_size / 512), len(loader)
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        data.epoch = epoch
        model.train()
        sums, t0 = {}, time.time()
        for it, (x, y, index) in enumerate(common.progress(loader, f"{stage} epoch {epoch + 1}", rank == 0)):
            step, total = epoch * steps + it, args.epochs * steps
            lr = common.poly_lr(base_lr, step, total) if sgd else common.cosine_lr(base_lr, step, total)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with common.autocast(device, args.amp):
                kw = {"cluster_maps": True} if cluster_maps else {}
                out = (model(x, **kw) if cache is None else
                       model(cached_features(S, cache, x, index, data), from_features=True, **kw))
                loss, terms = objective(x, y, out)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {it}; lower --lr")
            # this process's share of the global batch's mean, so that DDP's gradient is the 1-process one
            w = common.global_mean_weight(MEAN_OVER[mean_over](x, y), world)
            loss, terms = loss * w, {name: value * w for name, value in terms.items()}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if extra is not None:  # outside DDP's model: average its gradients over processes as DDP does S's
                common.average_gradients(extra.parameters(), world)
            opt.step()
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        means = {n: common.all_reduce_mean(v / steps, world) for n, v in sums.items()}
        common.epoch_line(log, stage, epoch + 1, args.epochs, means, lr, time.time() - t0)
        if rank == 0:
            common.save_checkpoint({"kind": "mask_generator", "stage": stage, "model": S.state_dict(),
                                    "optimizer": opt.state_dict(), "epoch": epoch + 1, "epochs": args.epochs,
                                    "done": epoch + 1 == args.epochs, "num_classes": K, "class_names": names,
                                    "clusters": S.clusters, "extra": None if extra is None else extra.state_dict(),
                                    "args": vars(args)}, ckpt_path)
    log(f"done: {ckpt_path}")
    common.cleanup_distributed()
    return ckpt_path
