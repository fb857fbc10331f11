"""Benchmark at the paper's VOC shapes: time and memory of every heavy step on one device.

    python tools/bench.py --device cuda                                   # paper batch sizes, bf16 and fp32 (GPU)
    python tools/bench.py --device cpu --batch 2 --batch_b 16             # the CPU table of docs/log.md (2 cores)
    python tools/bench.py --dataset toy --device cpu                      # toy shapes, seconds (the smoke test's)
    python tools/bench.py --device cuda --backbone deit                   # S = WeakTr's DeiT-S (the paper's)

Random weights and synthetic data of the dataset's image size (speed does not depend on the values);
`--dataset voc` (default) and `coco` time the paper's shapes, `toy` the toy world's. Measured:
- CAM network step (train_cam.py: all of S trains; `--backbone deit`: WeakTr's three losses) at `--batch` images;
- stage (a) and (c) step: ResNet-50 S at 448 (output stride 16, `--train head` as the default; `--backbone deit`:
  DeiT-S at 224, head and fusion train, masks from the fine CAM) and ViT-B/32 at 224; `--batch` images with
  `--classes` present classes each (VOC train_aug averages 1.5); forward, L_match (+ L_refine), backward, AdamW
  step. Milliseconds per step (median of --steps) and peak memory (CUDA: max allocated; CPU: the process's peak
  RSS so far, a ceiling);
- stage (b): one epoch over VOC train_aug's ~15,900 (image, class) pairs at --batch_b pairs per step, with the
  background cache (prompts through the text encoder, L_prompt) and without it (S and the CLIP image encoder
  on every step as well), extrapolated from --steps steps;
- make_pseudo: CAMs (scales 1.0, 1.2, each with its flip) of 500x375 images (a DeiT S at the image's own size,
  as WeakTr), images/s; dense CRF and PNG
  writing per image with 1 and --workers processes, images/s;
- eval_miou: --pairs (prediction, ground truth) PNG pairs of 500x375 (VOC val: 1,449), with 0 and --workers
  processes, seconds.
Writes --json (every figure) and prints one table per precision.
"""
import json
import multiprocessing as mp
import os
import sys
import resource
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's semples/, clip/
import clip
from semples import datasets, presets, runtime
from semples.cams import CRF_DEFAULTS, CRF_GT_PROB, multiscale_cams, pseudo_mask
from semples.method import L_match, L_prompt, L_refine, Prompts, encode_images, masked_pairs
from semples.metrics import evaluate
from semples.network import mask_style, new_mask_generator

VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
TINY_CLIP = dict(embed_dim=64, image_resolution=64, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=40, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
# Per dataset: classes K, image size (h, w), training images, S (backbone, output stride, input size)
SHAPES = {"voc": (20, (375, 500), 10_582, ("resnet50", 16, 448)),
          "coco": (80, (480, 640), 82_081, ("resnet50", 16, 448)),
          "toy": (8, (96, 96), 2_000, ("tiny", 8, 96))}
DEIT_SHAPES = {"voc": ("deit_s", 16, 224), "coco": ("deit_s", 16, 224), "toy": ("deit_toy", 8, 96)}  # --backbone deit


def build_parser():
    p = runtime.new_parser(__doc__)
    p.add_argument("--device", type=runtime.device_name, default=runtime.default_device(), help="cuda, cuda:1 or cpu")
    p.add_argument("--json", type=str, default=None,
                   help="where to write the figures (default: out/bench/DATASET.json; DATASET_deit.json with "
                        "--backbone deit)")
    p.add_argument("--precision", type=str, nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp32"),
                   help="bf16 autocast and/or fp32 (bf16 is CUDA only; skipped on CPU)")
    p.add_argument("--backbone", type=str, default="resnet", choices=("resnet", "deit"),
                   help="S: the ResNet CAM network (CLIMS's) or WeakTr's DeiT-S (the paper's; deit_toy on toy)")
    p.add_argument("--batch", type=runtime.positive_int, default=64,
                   help="images per CAM network and stage (a)/(c) step (paper: 64)")
    p.add_argument("--batch_b", type=runtime.positive_int, default=128, help="pairs per stage (b) step (release: 128)")
    p.add_argument("--classes", type=runtime.positive_float, default=1.5, help="present classes per image")
    p.add_argument("--steps", type=runtime.positive_int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--images", type=runtime.positive_int, default=8, help="images timed in make_pseudo")
    p.add_argument("--pairs", type=runtime.positive_int, default=1449, help="mask pairs of the eval_miou timing")
    p.add_argument("--workers", type=runtime.positive_int, default=os.cpu_count(),
                   help="processes of the multi-process CRF and eval timings")
    p.add_argument("--seed", type=runtime.nonnegative_int, default=0, help="random seed")
    return p


PRESETS = presets.of("bench")


def timed(fn, steps, device):
    """Median wall time (s) of `steps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def labels(batch, classes, K, g):
    """Multi-hot [batch, K] with `classes` present classes per image on average (at least one)."""
    y = torch.zeros(batch, K)
    for b in range(batch):
        n = max(1, int(classes) + (torch.rand(1, generator=g).item() < classes % 1))
        y[b, torch.randperm(K, generator=g)[:n]] = 1
    return y


def bench_cam_network(args, device, amp, backbone, stride, size):
    """One step of train_cam.py: all of S trains (a DeiT S on WeakTr's three logits, a ResNet on its pooled CAMs)."""
    K = SHAPES[args.dataset][0]
    g = torch.Generator().manual_seed(args.seed)
    S = new_mask_generator(backbone, K, stride).to(device).train()
    x = torch.rand(args.batch, 3, size, size, generator=g).to(device)
    y = labels(args.batch, args.classes, K, g).to(device)
    opt = torch.optim.AdamW([p for p in S.parameters() if p.requires_grad], lr=1e-5)
    deit = backbone.startswith("deit")

    def step():
        with runtime.autocast(device, amp):
            logits = S(x, logits=True) if deit else [S(x).float().mean((2, 3))]
            loss = sum(F.multilabel_soft_margin_loss(o.float(), y) for o in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    reset_peak(device)
    out = {"cam_network_ms_per_step": 1000 * timed(step, args.steps, device),
           "cam_network_peak_gib": peak_memory_gib(device)}
    del S, opt
    return out


def bench_training(args, device, amp, S, backbone, clip_model, size, res):
    """Stages (a), (c) and (b) on one device at one precision."""
    K, _, n_images, _ = SHAPES[args.dataset]
    g = torch.Generator().manual_seed(args.seed)
    u_f = F.normalize(torch.randn(K, clip_model.text_projection.shape[1], generator=g), dim=-1).to(device)
    u_b = F.normalize(torch.randn(K, u_f.shape[1], generator=g), dim=-1).to(device)
    x = torch.rand(args.batch, 3, size, size, generator=g).to(device)
    y = labels(args.batch, args.classes, K, g).to(device)
    opt = torch.optim.AdamW([p for p in S.parameters() if p.requires_grad], lr=1e-5)
    out = {}
    for stage in ("a", "c"):
        def step():
            with runtime.autocast(device, amp):
                X_f, X_b, k, _, _ = masked_pairs(x, S(x), y, res, **mask_style(backbone, "match"))
                v_f, v_b = encode_images(clip_model, torch.cat([X_f, X_b])).chunk(2)
                loss = L_match(v_f, v_b, u_f[k], 2.4)[0] + (0.05 * L_refine(v_f, u_b[k]) if stage == "c" else 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        reset_peak(device)
        out[f"stage_{stage}_ms_per_step"] = 1000 * timed(step, args.steps, device)
        out[f"stage_{stage}_peak_gib"] = peak_memory_gib(device)
    # stage (b): prompts through the text encoder on cached v^b, or with S and the image encoder as well
    prompts = Prompts(clip_model, K, 8 if args.dataset == "toy" else 30).to(device)  # the presets' lengths
    p_opt = torch.optim.AdamW(prompts.parameters(), lr=1e-3)
    k = torch.randint(K, (args.batch_b,), generator=g).to(device)
    v_b = F.normalize(torch.randn(args.batch_b, u_f.shape[1], generator=g), dim=-1).to(device)
    n_img = max(1, round(args.batch_b / args.classes))
    xb = torch.rand(n_img, 3, size, size, generator=g).to(device)
    yb = labels(n_img, args.classes, K, g).to(device)
    for cached in (True, False):
        def step():
            with runtime.autocast(device, amp):
                vb = v_b
                if not cached:
                    with torch.no_grad():
                        _, X_b, _, _, _ = masked_pairs(xb, S(xb), yb, res, **mask_style(backbone, "prompt"))
                        vb = encode_images(clip_model, X_b)[:args.batch_b].float()
                loss = L_prompt(prompts(clip_model)[k[:len(vb)]], vb, u_f[k[:len(vb)]], 0.02)[0]
            p_opt.zero_grad(set_to_none=True)
            loss.backward()
            p_opt.step()
        t = timed(step, args.steps, device)
        steps = -(-round(n_images * args.classes) // args.batch_b)
        out[f"stage_b_epoch_s_{'cached' if cached else 'uncached'}"] = t * steps
        out[f"stage_b_ms_per_step_{'cached' if cached else 'uncached'}"] = 1000 * t
    out["stage_b_steps_per_epoch"] = steps
    return out


def smooth(g, shape, cells=(6, 8)):
    """Smooth random maps in [0, 1] of `shape` [C, H, W] (bilinear upsampling of a coarse random grid)."""
    coarse = torch.rand(1, shape[0], *cells, generator=g)
    return F.interpolate(coarse, shape[-2:], mode="bilinear", align_corners=False)[0].numpy()


def _crf_task(job):
    torch.set_num_threads(1)
    cams, classes, image, path = job
    datasets.save_mask(path, pseudo_mask(cams, classes, 0.15, image, dict(gt_prob=CRF_GT_PROB, **CRF_DEFAULTS)))
    return path


def bench_cams(args, device, amp, S, size, h, w):
    """make_pseudo's CAMs of one image (scales 1.0 and 1.2, each with its flip) on the device."""
    g = torch.Generator().manual_seed(args.seed)
    x = (255 * torch.rand(1, h, w, 3, generator=g)).to(torch.uint8)
    reset_peak(device)
    return {"cams_img_per_s": 1 / timed(lambda: multiscale_cams(S, x, (1.0, 1.2), size, device, amp), args.steps,
                                        device), "cams_peak_gib": peak_memory_gib(device)}


def bench_crf(args, device, tmp, h, w):
    """make_pseudo's dense CRF and PNG writing (CPU, whatever the device), in 1 and --workers processes."""
    g = torch.Generator().manual_seed(args.seed)
    out = {}
    jobs = [(smooth(g, (2, h, w)).astype(np.float32), np.array([1, 2]),
             (255 * smooth(g, (3, h, w), (24, 32))).astype(np.uint8).transpose(1, 2, 0).copy(),
             os.path.join(tmp, f"crf{i}.png")) for i in range(args.images)]
    out["crf_img_per_s_1_workers"] = len(jobs) / timed(lambda: list(map(_crf_task, jobs)), 1, device)
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:  # started (and warmed) before the clock
            run = lambda: list(pool.imap_unordered(_crf_task, jobs))  # noqa: E731
            out[f"crf_img_per_s_{args.workers}_workers"] = len(jobs) / timed(run, 1, device)
    return out


def bench_eval(args, tmp, h, w):
    K = SHAPES[args.dataset][0]
    rng = np.random.default_rng(args.seed)
    pairs = []
    for i in range(args.pairs):
        gt = np.kron(rng.integers(0, K + 1, (5, 5)), np.ones((h // 5 + 1, w // 5 + 1), int))[:h, :w].astype(np.uint8)
        gt[rng.random((h, w)) < 0.02] = 255
        pred = np.where(rng.random((h, w)) < 0.1, rng.integers(0, K + 1, (h, w)), np.minimum(gt, K)).astype(np.uint8)
        pair = (os.path.join(tmp, f"gt{i}.png"), os.path.join(tmp, f"pred{i}.png"))
        datasets.save_mask(pair[0], gt)
        datasets.save_mask(pair[1], pred)
        pairs.append(pair)
    out = {}
    for workers in sorted({0, args.workers}):
        t0 = time.perf_counter()
        evaluate(pairs, K + 1, "pred", workers=workers)
        out[f"eval_s_{workers}_workers"] = time.perf_counter() - t0
    return out


def main(args):
    device, _, _ = runtime.setup_device(args.device)
    torch.manual_seed(args.seed)
    args.json = args.json or os.path.join(runtime.REPO, "out", "bench",
                                          f"{args.dataset}{'_deit' if args.backbone == 'deit' else ''}.json")
    K, (h, w), n_images, (backbone, stride, size) = SHAPES[args.dataset]
    if args.backbone == "deit":
        backbone, stride, size = DEIT_SHAPES[args.dataset]
    S = new_mask_generator(backbone, K, stride).set_trainable("head").to(device)
    clip_model = clip.model.CLIP(**(TINY_CLIP if args.dataset == "toy" else VIT_B_32)).float().to(device).eval()
    for p in clip_model.parameters():
        p.requires_grad_(False)
    res = clip_model.visual.input_resolution
    precisions = [p for p in args.precision if p == "fp32" or device.type == "cuda"] or ["fp32"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    report = {"device": name,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
              "shapes": f"S {backbone} at {size} (stride {stride}), CLIP at {res}", "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shared = {**bench_crf(args, device, tmp, h, w), **bench_eval(args, tmp, h, w)}  # CPU work: once
        for prec in precisions:
            amp = prec == "bf16"
            cam_size = None if backbone.startswith("deit") else size  # a DeiT S: each image at its own size
            report["results"][prec] = {**bench_cam_network(args, device, amp, backbone, stride, size),
                                       **bench_training(args, device, amp, S, backbone, clip_model, size, res),
                                       **bench_cams(args, device, amp, S, cam_size, h, w), **shared}
    with runtime.atomic_path(args.json) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    for prec, r in report["results"].items():
        print(f"\nbench on {report['device']}, torch {report['torch']}, {prec}, {report['threads']} threads; "
              f"{report['shapes']}")
        rows = [(f"CAM network step, batch {args.batch}", f"{r['cam_network_ms_per_step']:.0f} ms",
                 f"{r['cam_network_peak_gib']:.1f} GiB")]
        rows += [(f"stage ({s}) step, batch {args.batch}", f"{r[f'stage_{s}_ms_per_step']:.0f} ms",
                  f"{r[f'stage_{s}_peak_gib']:.1f} GiB") for s in "ac"]
        rows += [(f"stage (b) epoch, {c}, {args.batch_b} pairs/step", f"{r[f'stage_b_epoch_s_{k}']:.1f} s", "")
                 for c, k in (("cache", "cached"), ("no cache", "uncached"))]
        rows += [("make_pseudo CAMs, scales 1.0+1.2 with flips", f"{r['cams_img_per_s']:.1f} img/s",
                  f"{r['cams_peak_gib']:.1f} GiB")]
        rows += [(f"make_pseudo CRF + PNG, {n.split('_')[-2]} worker(s)", f"{v:.1f} img/s", "")
                 for n, v in r.items() if n.startswith("crf_img_per_s")]
        rows += [(f"eval_miou, {args.pairs} pairs {h}x{w}, {n.split('_')[-2]} workers (start incl.)", f"{v:.1f} s", "")
                 for n, v in r.items() if n.startswith("eval_s")]
        for name, value, mem in rows:
            print(f"  {name:52s} {value:>12s} {mem:>9s}")
        epoch = r["stage_a_ms_per_step"] * -(-n_images // args.batch) / 1000
        print(f"  stage (a): one epoch ({n_images:,} images) at this batch {epoch:.0f} s, 60 epochs {epoch:.0f} min"
              + (" (issue target, one H100, VOC, batch 64: <= 90 ms/step, 60 epochs <= 15 min)"
                 if args.dataset == "voc" else ""))
    print(f"written: {args.json}")


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
