"""Stage (a) Segment-Label Matching: train the mask generator S so that the masked foreground M*X
matches "a photo of {class}." in a frozen CLIP and the background (1-M)*X does not.

    L_match = E[ -log sim(v^f_k, u^f_k) - lambda_b * log(1 - sim(v^b_k, u^f_k)) ]

S is a CAM network. The paper starts it from a classification-trained CAM network; here an optional
classification warm-up (`--cls_epochs`, multi-label soft margin on the pooled CAMs) makes one from
ImageNet (or random) weights inside this script, and `--lambda_cls` keeps that loss on during matching
(0 = the paper's pure L_match). The state of S when matching starts is saved as OUT/init.pt: stage (c)
starts from it, as the paper's stages (a) and (c) both start from the same CAM network.

Toy world (CPU, about 2 minutes):
    python train_match.py --dataset toy --device cpu
Paper, VOC (one GPU; `torchrun --nproc_per_node 4 train_match.py ...` for four):
    python train_match.py --dataset voc --data data/VOCdevkit/VOC2012 --init data/resnet50-imagenet.pth

Writes OUT/checkpoint.pt (S, optimizer, epoch, args; resumed from if present), OUT/init.pt,
OUT/log.txt, OUT/args.json. train_refine.py reuses this loop with `u_b` (the learned prompts) set.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from semples import (BACKBONES, L_match, L_refine, build_mask_generator, class_text_features,
                     encode_images, load_frozen_clip, masked_pairs)

PRESETS = common.presets(
    voc=dict(lambda_b=2.4, lr=5e-4, batch_size=64, epochs=60, backbone="resnet50", output_stride=16,
             size=448, clip_res=224, cls_epochs=5, lambda_cls=0.0, out="out/voc/match"),
    coco=dict(lambda_b=0.75, lr=5e-6, batch_size=64, epochs=60, backbone="resnet50", output_stride=16,
              size=448, clip_res=224, cls_epochs=5, lambda_cls=0.0, out="out/coco/match"),
    # Toy: a tiny S at 96 px and a 64 px CLIP; from random weights, so a classification warm-up first
    # (cls_lr), then gentle matching (lr) with CLIMS's area term: without it, and at the warm-up's lr,
    # the masks grow over everything the biased tiny CLIP links with the class (seed mIoU 39 vs 52).
    toy=dict(lambda_b=2.4, lr=0.008, cls_lr=0.032, batch_size=32, epochs=6, backbone="tiny", output_stride=8,
             size=96, clip_res=64, cls_epochs=6, lambda_cls=1.0, lambda_area=0.2, out="out/toy/match", workers=1),
)


def build_parser(description=__doc__):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(p)
    p.add_argument("--clip", type=str, default=None, help="CLIP model name (e.g. ViT-B/32) or checkpoint path")
    p.add_argument("--split", type=str, default="train_aug", help="image list S trains on")
    p.add_argument("--out", type=str, default=None, help="output folder")
    p.add_argument("--init", type=str, default=None,
                   help="S init: ImageNet torchvision state dict or an S checkpoint; none = random")
    p.add_argument("--backbone", type=str, default="resnet50", choices=BACKBONES, help="backbone of S")
    p.add_argument("--output_stride", type=int, default=16, help="output stride of S (8, 16, 32)")
    p.add_argument("--size", type=int, default=448, help="S input size (square)")
    p.add_argument("--clip_res", type=int, default=224, help="CLIP input resolution of the masked images")
    p.add_argument("--batch_size", type=int, default=64, help="images per step, summed over GPUs")
    p.add_argument("--epochs", type=int, default=60, help="epochs of matching (after the warm-up)")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="AdamW lr before scaling by batch/512, as in the authors' release")
    p.add_argument("--weight_decay", type=float, default=0.03, help="AdamW weight decay")
    p.add_argument("--lambda_b", type=float, default=2.4, help="weight of the background term of L_match")
    p.add_argument("--cls_epochs", type=int, default=0, help="classification-only warm-up epochs")
    p.add_argument("--cls_lr", type=float, default=None,
                   help="lr of the warm-up, before scaling by batch/512 (default: --lr)")
    p.add_argument("--lambda_cls", type=float, default=0.0,
                   help="classification loss weight during matching (0 = pure L_match)")
    p.add_argument("--lambda_area", type=float, default=0.0,
                   help="CLIMS area term weight on mean(M) (0 = off, as in the paper)")
    p.add_argument("--template", type=str, default="a photo of {}.", help="class text template")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoint.pt if present")
    return p


def train(args, u_b=None, stage="match"):
    """The training loop of stages (a) and (c). With `u_b` (K x D background prompt features) the loss
    gains lambda * L_refine, which is stage (c)."""
    device, rank, world = common.setup_device(args.device)
    common.seed_everything(args.seed)
    log = common.Logger(args.out, rank)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")

    # ---- data, S, frozen CLIP ----
    names = common.read_class_names(args.data, args.dataset)
    K = len(names)
    data = common.ClsDataset(args.data, args.split, K, args.size, augment=True, seed=args.seed)
    sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(data, args.batch_size // world, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    if len(loader) == 0:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the {len(data)} images of '{args.split}'")
    S = build_mask_generator(args.backbone, K, args.output_stride, args.init).to(device)
    clip_model = load_frozen_clip(args.clip, device)
    u_f = class_text_features(clip_model, names, args.template)  # once, not every step
    if u_b is not None:
        if u_b.shape[0] != K:
            raise ValueError(f"the prompts hold {u_b.shape[0]} classes, the dataset has {K}")
        u_b = u_b.to(device)

    # Two phases, each with a fresh AdamW and its own cosine: the warm-up stands in for the separately
    # trained CAM network of the paper, so matching here and in stage (c) follow the same schedule.
    def phase(epoch):
        """(first epoch, length, base lr) of the phase `epoch` belongs to."""
        if epoch < args.cls_epochs:
            return 0, args.cls_epochs, (args.cls_lr or args.lr) * args.batch_size / 512
        return args.cls_epochs, args.epochs, args.lr * args.batch_size / 512

    def new_optimizer():
        return torch.optim.AdamW(S.parameters(), lr=0.0, weight_decay=args.weight_decay)

    opt = new_optimizer()
    total_epochs = args.cls_epochs + args.epochs
    start = 0
    if args.resume and os.path.exists(ckpt_path):
        ckpt = common.load_checkpoint(ckpt_path, "mask_generator", "--out")
        if ckpt["num_classes"] != K:
            raise ValueError(f"{ckpt_path} has {ckpt['num_classes']} classes, the dataset {K}; use a new --out")
        S.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"]
        log(f"resumed from {ckpt_path} at epoch {start}/{total_epochs}")
    elif rank == 0:
        common.save_args(args, args.out)
    model = DDP(S, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else S

    def save(path, epoch):
        if rank == 0:
            common.save_checkpoint({"kind": "mask_generator", "stage": stage, "model": S.state_dict(),
                                    "optimizer": opt.state_dict(), "epoch": epoch, "epochs": total_epochs,
                                    "done": epoch == total_epochs, "num_classes": K, "class_names": names,
                                    "args": vars(args)}, path)

    if stage == "match" and start == args.cls_epochs and not os.path.exists(os.path.join(args.out, "init.pt")):
        save(os.path.join(args.out, "init.pt"), start)  # the CAM network matching starts from
    steps_per_epoch = len(loader)
    for epoch in range(start, total_epochs):
        if epoch == args.cls_epochs > 0:
            opt = new_optimizer()  # matching starts afresh, exactly as stage (c) will from init.pt
        first, length, lr = phase(epoch)
        sampler.set_epoch(epoch)
        data.epoch = epoch
        warmup = epoch < args.cls_epochs
        model.train()
        sums, t0 = {}, time.time()
        for it, (x, y, _) in enumerate(common.progress(loader, f"epoch {epoch + 1}", rank == 0)):
            for g in opt.param_groups:
                g["lr"] = common.cosine_lr(lr, (epoch - first) * steps_per_epoch + it, length * steps_per_epoch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with common.autocast(device, args.amp):
                # ---------------- algorithm logic ----------------
                cams = model(x)
                terms = {"L_cls": F.multilabel_soft_margin_loss(cams.float().mean((2, 3)), y)}
                if warmup:
                    loss = terms["L_cls"]
                else:
                    X_f, X_b, k, _, M = masked_pairs(x, cams, y, args.clip_res)
                    v_f, v_b = encode_images(clip_model, torch.cat([X_f, X_b])).chunk(2)  # one CLIP pass
                    terms["L_match"], terms["fg"], terms["bg"] = L_match(v_f, v_b, u_f[k], args.lambda_b)
                    loss = terms["L_match"] + args.lambda_cls * terms["L_cls"]
                    if args.lambda_area:
                        terms["area"] = M.mean()
                        loss = loss + args.lambda_area * terms["area"]
                    if u_b is not None:
                        terms["L_refine"] = L_refine(v_f, u_b[k])
                        loss = loss + args.lambda_refine * terms["L_refine"]
                # --------------------------------------------------
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {it}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            terms["loss"] = loss
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        means = {n: common.all_reduce_mean(v / steps_per_epoch, world) for n, v in sums.items()}
        log(f"epoch {epoch + 1}/{total_epochs} [{'cls-warmup' if warmup else stage}] "
            + " ".join(f"{n} {v:.4f}" for n, v in means.items())
            + f" lr {opt.param_groups[0]['lr']:.2e} time {time.time() - t0:.1f}s")
        save(ckpt_path, epoch + 1)
        if stage == "match" and epoch + 1 == args.cls_epochs:
            save(os.path.join(args.out, "init.pt"), epoch + 1)
    log(f"done: {ckpt_path}")
    common.cleanup_distributed()
    return ckpt_path


def main(args):
    train(args)


if __name__ == "__main__":
    main(common.parse_args(build_parser(), PRESETS))
