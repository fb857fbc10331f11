"""Stage (a) Segment-Label Matching: train the mask generator S so that the masked foreground M*X
matches "a photo of {class}." in a frozen CLIP and the background (1-M)*X does not.

    L_match = E[ -log sim(v^f_k, u^f_k) - lambda_b * log(1 - sim(v^b_k, u^f_k)) ]        (Eq. 1)

S starts from the CAM network of train_cam.py (--init) and, by default, only its 1x1 classifier trains
(--train head), as in the authors' release (docs/method.md, "Where we depart from the release", has the measurement).

Toy world (CPU, about 3 minutes):
    python train_match.py --dataset toy --device cpu
Paper, VOC (one GPU; `torchrun --nproc_per_node 4 train_match.py ...` for four):
    python train_match.py --dataset voc --init out/voc/cam/checkpoint.pt

Reads the CAM network checkpoint and the CLIP; writes OUT/checkpoint.pt (S, optimizer, epoch, args;
resumed from if present), OUT/log.txt, OUT/args.json.
"""
import argparse

import torch

from semples import datasets, presets, runtime, train_loop
from semples.method import FILLS, L_area, L_match, class_text_features, encode_images, load_frozen_clip, masked_pairs
from semples.network import mask_style

PRESETS = presets.of("train_match")


def build_parser():
    # the release's VOC schedule; every flag below but --lambda_b (the paper's) is the release's default
    p = train_loop.add_flags(runtime.new_parser(__doc__), epochs=60, lr=5e-4, batch_size=64)
    # stage (a)'s own flags; train_refine.py declares the same ones (a test checks they agree), so that stage
    # (c) with --lambda_refine 0 is stage (a) trained on
    p.add_argument("--clip", type=str, default=None, help="CLIP model name (e.g. ViT-B/32) or checkpoint path")
    p.add_argument("--init", type=str, default=None,
                   help="checkpoint of S to start from (stage a: the CAM network; stage c: stage (a)'s S)")
    p.add_argument("--train", type=str, default="head", choices=("head", "all"),
                   help="what of S trains: the 1x1 classifier on fixed features (the release), or everything")
    p.add_argument("--fill", type=str, default="mean", choices=FILLS,
                   help="masked-out pixels: CLIP's mean colour (the mask multiplies the normalised image, "
                        "as CLIMS and the release do) or black")
    p.add_argument("--lambda_b", type=runtime.nonnegative_float, default=2.4,
                   help="weight of the background term of L_match (Eq. 1)")
    p.add_argument("--lambda_area", type=runtime.nonnegative_float, default=0.0,
                   help="weight of CLIMS's area term mean(M), not in the paper (0 = off): it keeps M from "
                        "covering the whole image, L_match's trivial minimum")
    p.add_argument("--cache_features", action=argparse.BooleanOptionalAction, default=False,
                   help="with --train head (no effect with all): keep the fixed backbone features of each "
                        "(image, flip) in memory after their first use, so that later epochs run only the head "
                        "(the same training up to float rounding; memory: images x 2 x the feature map, 0.6 GB "
                        "on the toy world)")
    return p


def main(args):
    names = datasets.read_class_names(args.data, args.dataset)
    device, _, _ = runtime.setup_device(args.device)
    clip_model = load_frozen_clip(args.clip, device)
    u_f = class_text_features(clip_model, names)  # once, not every step
    res = clip_model.visual.input_resolution

    # ---------------- the objective: L_match (Eq. 1) ----------------
    def objective(x, y, cams):
        X_f, X_b, k, _, M = masked_pairs(x, cams, y, res, args.fill, **mask_style(args.backbone, "match"))
        v_f, v_b = encode_images(clip_model, torch.cat([X_f, X_b])).chunk(2)  # one CLIP pass
        l_match, fg, bg = L_match(v_f, v_b, u_f[k], args.lambda_b)
        area = L_area(M)  # extra term, not in the paper: 0 unless --lambda_area
        return l_match + args.lambda_area * area, {"L_match": l_match, "fg": fg, "bg": bg, "area": area}
    # ----------------------------------------------------------------

    train_loop.train(args, objective, "match", mean_over="pairs")  # L_match: a mean over (image, class) pairs


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
