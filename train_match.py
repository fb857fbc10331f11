"""Stage (a) Segment-Label Matching: train the mask generator S so that the masked foreground M*X
matches "a photo of {class}." in a frozen CLIP and the background (1-M)*X does not.

    L_match = E[ -log sim(v^f_k, u^f_k) - lambda_b * log(1 - sim(v^b_k, u^f_k)) ]        (Eq. 1)

S starts from the CAM network of train_cam.py (--init) and, by default, only its 1x1 classifier trains
(--train head), as in the authors' release (README, "Where this departs", has the measurement).

Toy world (CPU, about 3 minutes):
    python train_match.py --dataset toy --device cpu
Paper, VOC (one GPU; `torchrun --nproc_per_node 4 train_match.py ...` for four):
    python train_match.py --dataset voc --init out/voc/cam/checkpoint.pt

Reads the CAM network checkpoint and the CLIP; writes OUT/checkpoint.pt (S, optimizer, epoch, args;
resumed from if present), OUT/log.txt, OUT/args.json.
"""
import torch

import common
import trainer
from semples import L_area, L_match, class_text_features, encode_images, load_frozen_clip, masked_pairs

PRESETS = common.presets(
    voc=dict(out="out/voc/match", init="out/voc/cam/checkpoint.pt"),
    # COCO and toy: the values stages (a) and (c) share, trainer.MATCHING_PRESETS (with why).
    coco=dict(out="out/coco/match", init="out/coco/cam/checkpoint.pt", **trainer.MATCHING_PRESETS["coco"]),
    toy=dict(out="out/toy/match", init="out/toy/cam/checkpoint.pt", **trainer.MATCHING_PRESETS["toy"]),
)


def build_parser():
    return trainer.add_flags(common.new_parser(__doc__), epochs=60, lr=5e-4, batch_size=64, matching=True)


def main(args):
    names = common.read_class_names(args.data, args.dataset)
    device, _, _ = common.setup_device(args.device)
    clip_model = load_frozen_clip(args.clip, device)
    u_f = class_text_features(clip_model, names)  # once, not every step
    res = clip_model.visual.input_resolution

    # ---------------- the objective: L_match (Eq. 1) ----------------
    def objective(x, y, cams):
        X_f, X_b, k, _, M = masked_pairs(x, cams, y, res, args.fill)
        v_f, v_b = encode_images(clip_model, torch.cat([X_f, X_b])).chunk(2)  # one CLIP pass
        l_match, fg, bg = L_match(v_f, v_b, u_f[k], args.lambda_b)
        area = L_area(M)  # extra term, not in the paper: 0 unless --lambda_area
        return l_match + args.lambda_area * area, {"L_match": l_match, "fg": fg, "bg": bg, "area": area}
    # ----------------------------------------------------------------

    trainer.train(args, objective, "match", mean_over="pairs")  # L_match: a mean over (image, class) pairs


if __name__ == "__main__":
    common.run_cli(main, build_parser(), PRESETS)
