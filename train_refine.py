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
import torch

import common
import trainer
from semples import (L_area, L_match, L_prompt, L_refine, Prompts, class_text_features, encode_images, load_frozen_clip,
                     load_prompt_features, masked_pairs)

PRESETS = common.presets(
    voc=dict(out="out/voc/refine", init="out/voc/match/checkpoint.pt", prompts="out/voc/prompt/prompts.pt"),
    # COCO and toy: stage (a)'s values (trainer.MATCHING_PRESETS, so that lambda 0 is L_match alone), and lambda
    # (trainer.LAMBDA_REFINE, which says why toy's is 0.8).
    coco=dict(out="out/coco/refine", init="out/coco/match/checkpoint.pt", prompts="out/coco/prompt/prompts.pt",
              lambda_refine=trainer.LAMBDA_REFINE["coco"], lambda_T=0.01, **trainer.MATCHING_PRESETS["coco"]),
    toy=dict(out="out/toy/refine", init="out/toy/match/checkpoint.pt", prompts="out/toy/prompt/prompts.pt",
             prompt_length=8, lambda_refine=trainer.LAMBDA_REFINE["toy"], lambda_T=1.0,
             **trainer.MATCHING_PRESETS["toy"]),
)


def build_parser():
    p = trainer.add_flags(common.new_parser(__doc__), epochs=60, lr=5e-4, batch_size=64, matching=True)
    p.add_argument("--prompts", type=str, default=None, help="stage (b) prompts file")
    p.add_argument("--lambda_refine", type=common.nonnegative_float, default=trainer.LAMBDA_REFINE["voc"],
                   help="lambda, the weight of L_refine (Eq. 3)")
    p.add_argument("--joint", action="store_true",
                   help="paper Table 6: learn the prompts here, jointly with S, instead of reading --prompts")
    p.add_argument("--lambda_T", type=common.nonnegative_float, default=0.02, help="with --joint: L_prompt's lambda_T")
    p.add_argument("--prompt_length", type=common.positive_int, default=30, help="with --joint: prompt tokens")
    p.add_argument("--prompt_lr", type=common.positive_float, default=0.1,
                   help="with --joint: AdamW lr of the prompts before scaling by batch/512 (stage b's)")
    return p


def main(args):
    common.seed_everything(args.seed)  # before any weight is initialised
    names = common.read_class_names(args.data, args.dataset)
    device, _, _ = common.setup_device(args.device)
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
        X_f, X_b, k, _, M = masked_pairs(x, cams, y, res, args.fill)
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

    trainer.train(args, objective, "refine", extra=prompts if args.joint else None,
                  extra_lr=args.prompt_lr, mean_over="pairs")  # every term: a mean over (image, class) pairs


if __name__ == "__main__":
    common.run_cli(main, build_parser(), PRESETS)
