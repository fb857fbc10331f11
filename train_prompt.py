"""Stage (b) Contrastive Prompt Learning: with S frozen (from stage (a)), learn one token sequence p_k
per class that describes the class's co-occurring background.

    L_prompt = E[ -log sim(u^b_k, v^b_k) + lambda_T * log sim(u^b_k, u^f_k) ]      u^b_k = E_T(p_k)

The first term (L_prompt^I) pulls the prompt towards what CLIP sees in the background (1-M_k)*X; the
second (L_prompt^T) pushes it away from the class text. S is frozen and this stage has no
augmentation, so the background features v^b of every (image, class) pair never change: they are
computed once (cached in OUT/cache.pt) and the prompts train against the cache.

S's architecture, input size and the fill of the masked-out pixels are stage (a)'s, read from its
checkpoint (--match) and recorded in OUT/args.json. Under torchrun each step's batch of pairs is split over
the processes and weighted so that the gradient is the one of a single process.

Toy world (CPU, under a minute):
    python train_prompt.py --dataset toy --device cpu
Paper, VOC:
    python train_prompt.py --dataset voc --match out/voc/match/checkpoint.pt
Ablations (paper Table 4): `--lambda_T 0` (L_prompt^I only), `--no-image_term` (L_prompt^T only),
`--epochs 0` (unlearned, randomly initialised prompts).

Writes OUT/prompts.pt: the prompts [K, L, D], their text features u^b [K, D], the class names, the
CLIP identity, optimizer and epoch (resumed from if present), and at the end `nearest_words` ({class:
[[word, cosine], ...]}: the --nearest_k words of --words closest to u^b_k, also one log line per class) and
`fit` ({class: {pairs, u_b, u_f, refine_cos, refine_live}}: the mean cosine of u^b_k and of the class
text with the class's backgrounds v^b, one log line; and how far stage (c)'s L_refine reaches from u^b_k at
stage (a)'s masks, the mean cosine of the foregrounds v^f with it and the share of pairs above sim()'s clamp,
another log line);
OUT/log.txt, OUT/args.json.
"""
import argparse
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from semples import datasets, presets, runtime, train_loop
from semples.method import (EPS, WORDS, L_prompt, Prompts, class_text_features, clip_identity, encode_images,
                            load_frozen_clip, masked_pairs, nearest_words, read_words, weights_fingerprint)
from semples.network import load_mask_generator, mask_style

PRESETS = presets.of("train_prompt")


WORD_FLAGS = ("words", "nearest_k")  # they shape no prompt: a resumed run may change them


def build_parser():
    p = runtime.new_parser(__doc__)
    runtime.add_common_flags(p)
    p.add_argument("--clip", type=str, default=None, help="CLIP model name or checkpoint path (as stage a)")
    p.add_argument("--match", type=str, default=None, help="stage (a) checkpoint of S")
    p.add_argument("--split", type=str, default="train_aug", help="image list the prompts learn from")
    p.add_argument("--out", type=str, default=None, help="output folder")
    p.add_argument("--prompt_length", type=runtime.positive_int, default=30, help="learnable tokens per class (L)")
    p.add_argument("--batch_size", type=runtime.positive_int, default=128, help="(image, class) pairs per step")
    p.add_argument("--epochs", type=runtime.nonnegative_int, default=60,
                   help="epochs over the cached pairs (0 = unlearned prompts, a Table 4 ablation)")
    p.add_argument("--lr", type=runtime.positive_float, default=0.1, help="AdamW lr before scaling by batch/512")
    p.add_argument("--weight_decay", type=runtime.nonnegative_float, default=0.03, help="AdamW weight decay")
    p.add_argument("--lambda_T", type=runtime.nonnegative_float, default=0.02, help="weight of L_prompt^T")
    p.add_argument("--clip_grad", type=runtime.nonnegative_float, default=0.0,
                   help="clip the prompts' gradient to this total norm before each step (0: no clipping, as in the "
                        "release)")
    p.add_argument("--image_term", action=argparse.BooleanOptionalAction, default=True,
                   help="use L_prompt^I (off: the Table 4 'L_prompt^T only' row)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/prompts.pt if present (refused if result-shaping flags changed); "
                        "--no-resume removes it and starts afresh")
    p.add_argument("--words", type=str, default=WORDS,
                   help="word list (one word or phrase a line) whose nearest words to each learned prompt are "
                        "logged and kept in prompts.pt")
    p.add_argument("--nearest_k", type=runtime.positive_int, default=5, help="nearest words kept per class")
    return p


@torch.no_grad()
def background_cache(args, S, clip_model, K, device, log, rank=0):
    """v^b and k of every (image, present class) pair of the split, computed once with the frozen S at
    stage (a)'s input size and fill (args.size, args.fill), and v^f of the same pairs (for the log's reach of
    L_refine, not for training). The cache is keyed on what produced it (S's weights, the split and its data, the
    fill, the size, the CLIP)."""
    path = os.path.join(args.out, "cache.pt")
    data = datasets.ClsDataset(args.data, args.split, K, args.size, augment=False)
    args.data_key = data.key  # the cache and a resume hold only for the same data
    key = {"S": weights_fingerprint(S.state_dict()), "split": args.split, "fill": args.fill,
           "size": args.size, "clip": clip_identity(clip_model), "data": data.key}
    if os.path.exists(path):
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache.get("key") == key and "v_f" in cache:  # a cache without v^f is an older version's
            return cache["v_b"], cache["v_f"], cache["k"]
    loader = torch.utils.data.DataLoader(data, 64, shuffle=False, num_workers=args.workers)
    res = clip_model.visual.input_resolution
    v_b, v_f, ks = [], [], []
    for x, y, _ in runtime.progress(loader, "caching v^b"):
        x, y = x.to(device), y.to(device)
        with runtime.autocast(device, args.amp):
            X_f, X_b, k, _, _ = masked_pairs(x, S(x), y, res, args.fill, **mask_style(args.backbone, "prompt"))
            v_b.append(encode_images(clip_model, X_b).float().cpu())
            v_f.append(encode_images(clip_model, X_f).float().cpu())  # apart: v^b as before, to the last bit
        ks.append(k.cpu())
    v_b, v_f, ks = torch.cat(v_b), torch.cat(v_f), torch.cat(ks)
    log(f"cached v^b of {len(ks)} (image, class) pairs from {len(data)} images"
        + (f" ({data.note(args.split)})" if data.left_out else ""))
    if rank == 0:
        runtime.save_checkpoint({"v_b": v_b, "v_f": v_f, "k": ks, "key": key}, path)
    return v_b, v_f, ks


@torch.no_grad()
def background_fit(u_b, u_f, v_b, v_f, k, names):
    """Per class: how well its learned prompt u^b_k and its class text u^f_k match the backgrounds of its
    pairs (mean cosine with their v^b, the similarity L_prompt^I raises). The class text's fit is the
    co-occurrence bias plus object remnants: how much the backgrounds still look like the class. u^b sits
    below it by what L_prompt^T costs; on the toy world it mostly sits below the home scenery's own text
    too (23 of 24 classes over three runs; docs/method.md, "The toy presets", says why).
    And the reach of stage (c)'s L_refine from these prompts at stage (a)'s masks: the mean cosine of the
    foregrounds v^f with u^b_k, and the share of pairs where it exceeds the clamp floor EPS of sim(), i.e.
    where L_refine = -log(1 - sim(v^f, u^b)) has a gradient at all (below EPS the clamp makes it constant)."""
    fit = {}
    for i, n in enumerate(names):
        vb, vf = v_b[k == i].float(), v_f[k == i].float()
        if not len(vb):  # a class with no pair in the split: nothing to measure
            fit[n] = {"pairs": 0, "u_b": None, "u_f": None, "refine_cos": None, "refine_live": None}
            continue
        reach = vf @ u_b[i].float()
        fit[n] = {"pairs": len(vb), "u_b": float((vb @ u_b[i].float()).mean()),
                  "u_f": float((vb @ u_f[i].float()).mean()), "refine_cos": float(reach.mean()),
                  "refine_live": float((reach > EPS).float().mean())}
    return fit


def main(args):
    device, rank, world, log, out_path, names = train_loop.begin(args, "prompts.pt")
    K = len(names)
    words = read_words(args.words)  # read now: a bad path should not wait for the end of training
    S, match_ckpt = load_mask_generator(args.match, device, "--match", names)  # finished ones only
    for name in ("backbone", "output_stride", "size"):  # S as stage (a) built and fed it
        setattr(args, name, match_ckpt["args"][name])
    args.fill = match_ckpt["args"].get("fill", "mean")  # a CAM network checkpoint has no --fill: the default
    clip_model = load_frozen_clip(args.clip, device)
    u_f = class_text_features(clip_model, names)
    v_b, v_f, k = background_cache(args, S, clip_model, K, device, log, rank)
    v_b, k = v_b.to(device), k.to(device)
    del S
    if args.batch_size > len(k):  # clamping it would leave the lr scaled by a batch that never trains
        raise ValueError(f"--batch_size {args.batch_size} is larger than the {len(k)} (image, class) pairs of "
                         f"'{args.split}'; lower it")

    torch.manual_seed(args.seed)  # the prompts' init must not depend on whether the cache existed
    prompts = Prompts(clip_model, K, args.prompt_length).to(device)
    lr = args.lr * args.batch_size / 512
    opt = torch.optim.AdamW(prompts.parameters(), lr=lr, weight_decay=args.weight_decay)
    start = 0
    ckpt = runtime.resume_or_start(args, out_path, "prompts", log, rank, free=WORD_FLAGS)
    if ckpt is not None:
        prompts.prompts.data.copy_(ckpt["prompts"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"]
        log(f"resumed from {out_path} at epoch {start}/{args.epochs}")
    model = DDP(prompts) if world > 1 else prompts

    def save(epoch, extra=None):
        if rank == 0:
            with torch.no_grad():
                u_b = prompts(clip_model)
            runtime.save_checkpoint({"kind": "prompts", "prompts": prompts.prompts.detach().cpu(),
                                    "u_b": u_b.cpu(), "class_names": names, "num_classes": K,
                                    "clip": args.clip, "fingerprint": clip_identity(clip_model),
                                    "optimizer": opt.state_dict(),
                                    "epoch": epoch, "epochs": args.epochs, "done": epoch == args.epochs,
                                    "args": vars(args), **(extra or {})}, out_path)

    if args.epochs == 0 or start == 0:
        save(start)  # unlearned prompts are a valid (ablation) output too
    steps, batch = len(k) // args.batch_size, args.batch_size
    mine = slice(*runtime.rank_share(batch, rank, world))  # this process's pairs of each step's batch
    for epoch in range(start, args.epochs):
        order = torch.randperm(len(k), generator=torch.Generator().manual_seed(args.seed + epoch)).to(device)
        sums, t0 = {}, time.time()
        for it in range(steps):
            for g in opt.param_groups:
                g["lr"] = runtime.cosine_lr(lr, epoch * steps + it, args.epochs * steps)
            idx = order[it * args.batch_size:][:batch][mine]
            with runtime.autocast(device, args.amp):
                # ---------------- algorithm logic ----------------
                u_b = model(clip_model)  # all K prompts through the text encoder
                loss, term_I, term_T = L_prompt(u_b[k[idx]], v_b[idx], u_f[k[idx]], args.lambda_T,
                                                args.image_term)
                # --------------------------------------------------
            w = runtime.global_mean_weight(len(idx), world)  # this process's share of the batch's mean over pairs
            loss, term_I, term_T = loss * w, term_I * w, term_T * w
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(prompts.parameters(), args.clip_grad)
            opt.step()
            for name, value in (("L_prompt", loss), ("L_prompt_I", term_I), ("L_prompt_T", term_T)):
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        means = {n: runtime.all_reduce_mean(v / steps, world) for n, v in sums.items()}
        runtime.epoch_line(log, "prompt", epoch + 1, args.epochs, means, opt.param_groups[0]["lr"], time.time() - t0)
        save(epoch + 1)
    with torch.no_grad():
        u_b = prompts(clip_model)
    gap = (u_b * u_f).sum(-1)
    log("sim(u^b_k, u^f_k) per class: " + " ".join(f"{n} {v:.3f}" for n, v in zip(names, gap.tolist())))
    if rank == 0:  # after training, from the final u^b: nothing above (the prompts, the RNG) depends on it
        fit = background_fit(u_b, u_f, v_b, v_f.to(device), k, names)
        log("fit to the backgrounds (mean cosine with v^b of the class's pairs), u^b / class text u^f: "
            + " ".join(f"{n} {f['u_b']:.3f} / {f['u_f']:.3f}" for n, f in fit.items() if f["pairs"]))
        log("reach of L_refine at stage (a)'s masks (mean cosine of the foregrounds v^f with u^b; share of pairs above "
            f"the clamp {EPS:g}, the only ones L_refine moves): "
            + " ".join(f"{n} {f['refine_cos']:.3f} ({f['refine_live']:.2f})" for n, f in fit.items() if f["pairs"]))
        near = dict(zip(names, nearest_words(clip_model, u_b, words, args.nearest_k)))
        for n, pairs in near.items():
            log(f"nearest words to u^b {n}: " + ", ".join(f"{w} {c:.3f}" for w, c in pairs))
        save(args.epochs, {"nearest_words": near, "fit": fit})
    log(f"done: {out_path}")
    runtime.cleanup_distributed()


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
