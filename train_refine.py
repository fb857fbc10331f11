"""Stage (c) Prompt-guided Semantic Refinement: retrain S with the matching loss plus a term that
pushes each class's foreground away from that class's learned background prompt.

    L_total  = L_match + lambda * L_refine,      L_refine = E[ -log(1 - sim(v^f_k, u^b_k)) ]

The prompts (stage b) are fixed; only S trains. S starts from the same CAM network as stage (a)
(OUT of stage a / init.pt) with the same schedule, so `--lambda_refine 0` is stage (a)'s objective and
the two are comparable (paper Table 5 sweeps lambda). The refined S alone produces the final CAMs
(make_pseudo.py).
The training loop is stage (a)'s (train_match.train), with u^b set.

Toy world (CPU, about 2 minutes):
    python train_refine.py --dataset toy --device cpu
Paper, VOC:
    python train_refine.py --dataset voc --prompts out/voc/prompt/prompts.pt --init out/voc/match/init.pt

Writes OUT/checkpoint.pt (resumed from if present), OUT/log.txt, OUT/args.json.
"""
import torch

import common
import train_match
from semples import Prompts, load_frozen_clip
from train_prompt import clip_identity


def _refine(preset, dataset):
    """Stage (a)'s preset with this stage's paths and lambda; no classification warm-up: S starts from
    stage (a)'s init.pt, which is already past it."""
    return {**preset, "out": f"out/{dataset}/refine", "init": f"out/{dataset}/match/init.pt",
            "prompts": f"out/{dataset}/prompt/prompts.pt", "cls_epochs": 0,
            "lambda_refine": {"voc": 0.05, "coco": 0.2, "toy": 0.05}[dataset]}


PRESETS = {name: _refine(preset, name) for name, preset in train_match.PRESETS.items()}


def build_parser():
    p = train_match.build_parser(__doc__)
    p.add_argument("--prompts", type=str, default=None, help="stage (b) prompts file")
    p.add_argument("--lambda_refine", type=float, default=0.05, help="lambda, the weight of L_refine")
    return p


@torch.no_grad()
def background_features(args, names):
    """u^b from the saved prompts, re-encoded with this run's CLIP after checking it is the same one."""
    ckpt = common.load_checkpoint(args.prompts, "prompts", "--prompts")
    if ckpt["class_names"] != names:
        raise ValueError(f"--prompts {args.prompts} was learned for {ckpt['num_classes']} classes "
                         f"{ckpt['class_names'][:3]}..., the dataset has {len(names)} {names[:3]}...")
    clip_model = load_frozen_clip(args.clip, "cpu")
    if clip_identity(args, clip_model)["fingerprint"] != ckpt["fingerprint"]:
        raise ValueError(f"--prompts {args.prompts} was learned with CLIP '{ckpt['clip']}', not with "
                         f"--clip {args.clip}")
    prompts = Prompts(clip_model, len(names), ckpt["prompts"].shape[1])
    prompts.prompts.copy_(ckpt["prompts"])
    return prompts(clip_model)


def main(args):
    names = common.read_class_names(args.data, args.dataset)
    train_match.train(args, u_b=background_features(args, names), stage="refine")


if __name__ == "__main__":
    main(common.parse_args(build_parser(), PRESETS))
