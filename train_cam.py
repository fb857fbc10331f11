"""The CAM network: train S as a multi-label classifier on image-level labels. Its class activation maps
are the seeds every WSSS method starts from; SemPLeS's stages (a) and (c) both start from this network
(the paper starts from a classification-trained WeakTr, CLIMS from IRN's ResNet-50 CAM network).

    L_cls = multi-label soft margin( GAP(CAMs), y )       (the pooled CAMs are the class scores)

Toy world (CPU, about 2 minutes):
    python train_cam.py --dataset toy --device cpu
VOC (one GPU; `torchrun --nproc_per_node 4 train_cam.py ...` for four):
    python train_cam.py --dataset voc --init data/resnet50-imagenet.pth

Reads the images and their labels (derived from the masks); writes OUT/checkpoint.pt (S, optimizer,
epoch, args; resumed from if present), OUT/log.txt, OUT/args.json. The architecture and input size
chosen here travel in the checkpoint: later stages rebuild S from it.
"""
import torch.nn.functional as F

import common
import trainer
from semples import BACKBONES, build_mask_generator

PRESETS = common.presets(
    voc=dict(out="out/voc/cam"),
    coco=dict(out="out/coco/cam"),
    # Toy: a tiny S at 96 px from random weights (no ImageNet), so a higher lr.
    toy=dict(out="out/toy/cam", backbone="tiny", output_stride=8, size=96, batch_size=32, epochs=6, lr=0.032,
             workers=1),
)


def build_parser():
    p = trainer.add_flags(common.new_parser(__doc__), epochs=5, lr=0.01, batch_size=16)
    p.add_argument("--init", type=str, default=None,
                   help="ImageNet torchvision state-dict file for the backbone; none = random init")
    p.add_argument("--backbone", type=str, default="resnet50", choices=BACKBONES, help="backbone of S")
    p.add_argument("--output_stride", type=int, default=16, choices=(8, 16, 32), help="output stride of S")
    p.add_argument("--size", type=common.positive_int, default=448, help="S input size (square)")
    return p


def main(args):
    common.seed_everything(args.seed)  # before any weight is initialised
    names = common.read_class_names(args.data, args.dataset)
    S = build_mask_generator(args.backbone, len(names), args.output_stride, args.init)

    # ---------------- the objective ----------------
    def objective(x, y, cams):
        L_cls = F.multilabel_soft_margin_loss(cams.float().mean((2, 3)), y)
        return L_cls, {"L_cls": L_cls}
    # ------------------------------------------------

    trainer.train(args, objective, "cam", S=S)


if __name__ == "__main__":
    common.run_cli(main, build_parser(), PRESETS)
