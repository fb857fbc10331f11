"""Stage (c) Prompt-guided Semantic Refinement: retrain S with the matching loss plus a term that pushes
each class's foreground away from that class's learned background prompt u^b_k (stage b).

    L_total  = L_match + lambda * L_refine,      L_refine = E[ -log(1 - sim(v^f_k, u^b_k)) ]   (Eq. 3)

The prompts are fixed; only S trains, with stage (a)'s flags and schedule. S starts from stage (a)'s S, the
one whose masks the prompts were learned from (`--init`; the authors' release restarts from the CAM network
instead: docs/method.md says why we do not, with the measurement). So `--lambda_refine 0` is stage (a)
trained on with L_match alone, the control that shows what L_refine adds (paper Table 5 sweeps lambda).
The refined S alone produces the final CAMs (make_pseudo.py).
`--joint` is the paper's Table 6 alternative: no stage (b); the prompts start unlearned and train with
L_prompt (Eq. 2) in the same steps as S, which starts from the CAM network (`--init out/D/cam/checkpoint.pt`).

Toy world (CPU, about 3 minutes):
    python train_refine.py --dataset toy --device cpu
Paper, VOC:
    python train_refine.py --dataset voc --init out/voc/match/checkpoint.pt --prompts out/voc/prompt/prompts.pt

Reads stage (a)'s checkpoint (any S checkpoint), the prompts and the CLIP; writes OUT/checkpoint.pt (resumed from if
present), OUT/log.txt, OUT/args.json.
"""
import argparse

import torch

from semples import datasets, presets, runtime, train_loop
from semples.method import (FILLS, L_area, L_match, L_prompt, L_refine, Prompts, class_text_features, encode_images,
                            load_frozen_clip, load_prompt_features, masked_pairs)
from semples.network import mask_style

PRESETS = presets.of("train_refine")
JOINT_PROMPT_LR = 0.1  # --joint: the prompts' AdamW lr before scaling by batch/512, stage (b)'s


def build_parser():
    p = train_loop.add_flags(runtime.new_parser(__doc__), epochs=60, lr=5e-4, batch_size=64)
    # stage (a)'s flags (train_match.py; a test checks they agree): L_match is half of L_total
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
    # stage (c)'s own
    p.add_argument("--prompts", type=str, default=None, help="stage (b) prompts file")
    p.add_argument("--lambda_refine", type=runtime.nonnegative_float, default=0.05,
                   help="lambda, the weight of L_refine (Eq. 3; paper: 0.05 VOC)")
    p.add_argument("--joint", action="store_true",
                   help="paper Table 6: learn the prompts here, jointly with S, instead of reading --prompts")
    p.add_argument("--lambda_T", type=runtime.nonnegative_float, default=0.02,
                   help="with --joint: L_prompt's lambda_T (stage b's)")
    p.add_argument("--prompt_length", type=runtime.positive_int, default=30,
                   help="with --joint: prompt tokens (stage b's)")
    return p


def main(args):
    runtime.seed_everything(args.seed)  # before any weight is initialised
    names = datasets.read_class_names(args.data, args.dataset)
    device, _, _ = runtime.setup_device(args.device)
    clip_model = load_frozen_clip(args.clip, device)
    u_f = class_text_features(clip_model, names)
    res = clip_model.visual.input_resolution
    if args.joint:
        prompts = Prompts(clip_model, len(names), args.prompt_length)
        args.prompts = None  # not read
    else:
        u_b_fixed = load_prompt_features(args.prompts, clip_model, names)

    # ---------------- the objective: L_total (Eq. 3) ----------------
    def objective(x, y, cams):
        X_f, X_b, k, _, M = masked_pairs(x, cams, y, res, args.fill, **mask_style(args.backbone, "refine"))
        v_f, v_b = encode_images(clip_model, torch.cat([X_f, X_b])).chunk(2)
        l_match, fg, bg = L_match(v_f, v_b, u_f[k], args.lambda_b)
        u_b = prompts(clip_model) if args.joint else u_b_fixed
        l_refine = L_refine(v_f, u_b[k].detach())
        area = L_area(M)  # extra term, not in the paper: 0 unless --lambda_area
        loss = l_match + args.lambda_refine * l_refine + args.lambda_area * area
        terms = {"L_match": l_match, "fg": fg, "bg": bg, "L_refine": l_refine, "area": area}
        if args.joint:  # Table 6: stage (b)'s objective in the same step, S's masks held fixed for it
            terms["L_prompt"] = L_prompt(u_b[k], v_b.detach(), u_f[k], args.lambda_T)[0]
            loss = loss + terms["L_prompt"]
        return loss, terms
    # -----------------------------------------------------------------

    train_loop.train(args, objective, "refine", extra=prompts if args.joint else None,
                  extra_lr=JOINT_PROMPT_LR, mean_over="pairs")  # every term: a mean over (image, class) pairs


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
