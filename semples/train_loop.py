"""The one training loop for the mask generator S, shared by train_cam.py (the CAM network),
train_match.py (stage a) and train_refine.py (stage c). A stage hands it its objective,
`objective(x, y, cams) -> (loss, {name: term})`, a mean over the batch's images or (image, class) pairs;
everything else is here: data, S, the optimizer and its cosine, DDP (any process count trains on the
1-process batches with the 1-process gradient), bf16 autocast, resume, checkpoints and the epoch line
in OUT/log.txt.

Nothing in this file decides what S learns: read the stage files for that.
"""
import argparse
import os
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from semples import datasets, runtime
from semples.network import load_mask_generator


def add_flags(p, epochs, lr, batch_size):
    """Flags every S-training stage has (train_cam, train_match, train_refine); defaults are the paper's VOC
    values for that stage, given by the stage."""
    runtime.add_common_flags(p)
    p.add_argument("--split", type=str, default="train_aug", help="image list S trains on")
    p.add_argument("--out", type=str, default=None, help="output folder")
    p.add_argument("--batch_size", type=runtime.positive_int, default=batch_size,
                   help="images per step, summed over GPUs")
    p.add_argument("--epochs", type=runtime.positive_int, default=epochs, help="training epochs")
    p.add_argument("--lr", type=runtime.positive_float, default=lr,
                   help="AdamW lr before scaling by batch/512, as in the authors' release (cosine, no warm-up); "
                        "train_cam.py --optimizer sgd uses it as given (poly)")
    p.add_argument("--weight_decay", type=runtime.nonnegative_float, default=0.03, help="weight decay")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoint.pt if present (refused if result-shaping flags changed); "
                        "--no-resume removes it and starts afresh")
    return p


def begin(args, checkpoint="checkpoint.pt"):
    """What every training stage does first: pick the device (joining torchrun's process group), seed,
    open OUT/log.txt, read the class names. Returns (device, rank, world, log, OUT/checkpoint, names)."""
    device, rank, world = runtime.setup_device(args.device)
    runtime.seed_everything(args.seed)
    log = runtime.Logger(args.out, rank)
    names = datasets.read_class_names(args.data, args.dataset)
    return device, rank, world, log, os.path.join(args.out, checkpoint), names


# What an objective's mean is over, counted in a batch (x images, y multi-hot labels): the weight of each
# process's mean in the global one (runtime.global_mean_weight). One pair per present class (masked_pairs).
MEAN_OVER = {"images": lambda x, y: len(x), "pairs": lambda x, y: int(torch.count_nonzero(y))}


class GlobalBatches(torch.utils.data.Sampler):
    """This process's share of each global batch of `batch` images (runtime.rank_share). Every process draws
    the 1-process permutation of the epoch (DistributedSampler's: randperm seeded by seed + epoch), so the
    processes together train on exactly the batches one process would; a last partial batch is dropped."""

    def __init__(self, n, batch, rank, world, seed):
        self.n, self.batch, self.seed, self.epoch = n, batch, seed, 0
        self.start, self.stop = runtime.rank_share(batch, rank, world)

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


def train(args, objective, stage, S=None, extra=None, extra_lr=None, outputs=None, mean_over="images"):
    """Train S (built by the caller, or rebuilt from the --init checkpoint) with `objective` for
    args.epochs. `extra`: another module trained alongside S at `extra_lr` (the prompts, in joint
    training); saved in the checkpoint as "extra". `outputs`: keyword arguments of S's forward that make the
    objective get other outputs than the CAMs (train_cam.py: cluster_maps=True, or a DeiT S's logits=True).
    `mean_over`: what the objective's loss and terms are means over, "images" or "pairs" (MEAN_OVER). Optional
    args the stages may set: optimizer, head_lr_mult, warmup_epochs, min_lr, augment, train, cache_features.
    Writes OUT/checkpoint.pt every epoch; returns its path."""
    device, rank, world, log, ckpt_path, names = begin(args)
    K = len(names)
    if S is None:
        S, init = load_mask_generator(args.init, "cpu", "--init", names)
        for k in ("backbone", "output_stride", "size"):  # S keeps its architecture and input size
            setattr(args, k, init["args"][k])
    S.set_trainable(getattr(args, "train", "all"))
    S = S.to(device)
    # (image index, flipped) -> features of the frozen backbone; only a frozen backbone's features can be kept
    # (a DeiT S has no feature cache: its fixed part is the whole transformer, attention maps included)
    cache = {} if getattr(args, "cache_features", False) and S.frozen_backbone and hasattr(S, "features") else None
    data = datasets.ClsDataset(args.data, args.split, K, args.size, augment=getattr(args, "augment", "flip"),
                               seed=args.seed)
    args.data_key = data.key  # resume only on the same data
    if data.left_out:
        log(data.note(args.split))
    sampler = GlobalBatches(len(data), args.batch_size, rank, world, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the {len(data)} images of '{args.split}'")
    sgd = getattr(args, "optimizer", "adamw") == "sgd"  # train_cam.py's VOC/COCO recipe (IRN's); else AdamW
    head_ids = {id(p) for p in S.head_parameters()}
    head = [p for p in S.parameters() if p.requires_grad and id(p) in head_ids]
    body = [p for p in S.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": body, "lr_scale": 1.0}, {"params": head, "lr_scale": getattr(args, "head_lr_mult", 1.0)}]
    if extra is not None:
        extra = extra.to(device)
        groups.append({"params": list(extra.parameters()), "lr_scale": extra_lr / args.lr})
    groups = [g for g in groups if g["params"]]  # --train head: no backbone group
    opt = (torch.optim.SGD(groups, lr=0.0, weight_decay=args.weight_decay) if sgd else
           torch.optim.AdamW(groups, lr=0.0, weight_decay=args.weight_decay))

    start = 0
    ckpt = runtime.resume_or_start(args, ckpt_path, "mask_generator", log, rank, free=("cache_features",))
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
    warmup, min_lr = getattr(args, "warmup_epochs", 0) * steps, getattr(args, "min_lr", 0.0)
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        data.epoch = epoch
        model.train()
        sums, t0 = {}, time.time()
        for it, (x, y, index) in enumerate(runtime.progress(loader, f"{stage} epoch {epoch + 1}", rank == 0)):
            step, total = epoch * steps + it, args.epochs * steps
            lr = (runtime.poly_lr(base_lr, step, total) if sgd else
                  runtime.cosine_lr(base_lr, step, total, warmup, min_lr))
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with runtime.autocast(device, args.amp):
                kw = outputs or {}
                out = (model(x, **kw) if cache is None else
                       model(cached_features(S, cache, x, index, data), from_features=True, **kw))
                loss, terms = objective(x, y, out)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {it}; lower --lr")
            # this process's share of the global batch's mean, so that DDP's gradient is the 1-process one
            w = runtime.global_mean_weight(MEAN_OVER[mean_over](x, y), world)
            loss, terms = loss * w, {name: value * w for name, value in terms.items()}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if extra is not None:  # outside DDP's model: average its gradients over processes as DDP does S's
                runtime.average_gradients(extra.parameters(), world)
            opt.step()
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        means = {n: runtime.all_reduce_mean(v / steps, world) for n, v in sums.items()}
        runtime.epoch_line(log, stage, epoch + 1, args.epochs, means, lr, time.time() - t0)
        if rank == 0:
            runtime.save_checkpoint({"kind": "mask_generator", "stage": stage, "model": S.state_dict(),
                                    "optimizer": opt.state_dict(), "epoch": epoch + 1, "epochs": args.epochs,
                                    "done": epoch + 1 == args.epochs, "num_classes": K, "class_names": names,
                                    "clusters": S.clusters, "extra": None if extra is None else extra.state_dict(),
                                    "args": vars(args)}, ckpt_path)
    log(f"done: {ckpt_path}")
    runtime.cleanup_distributed()
    return ckpt_path
