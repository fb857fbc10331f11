"""The CAM network: train S as a multi-label classifier on image-level labels. Its class activation maps
are the seeds every WSSS method starts from; SemPLeS's stage (a) starts from this network, and stage (c) from
stage (a)'s result (the paper starts from a classification-trained WeakTr, CLIMS from IRN's ResNet-50 CAM network).

    L_cls = multi-label soft margin( GAP(CAMs), y )       (the pooled CAMs are the class scores)

With --backbone deit_s (WeakTr's DeiT-S, the paper's S; semples/deit.py) S has three outputs, each trained as
WeakTr does: the class tokens' logits (they train the transformer), the coarse CAM's (transformer and 3x3 head)
and the fine CAM's (the attention fusion only, its inputs being detached):
    L_WeakTr = sum over o in {class tokens, coarse, fine} of multi-label soft margin( logits_o, y )
and its presets are WeakTr's recipe (semples/presets.py, rows "voc/deit"...; the last epoch is kept, where WeakTr
keeps the epoch with the best train-set ground-truth mIoU).

With --clusters FILE (category clusters, after PCC, arXiv 2412.13823; docs/method.md): each cluster of
similar classes gets a shared map, added to the map of each of its classes, and cluster-level supervision
trains it (a cluster is present when any of its classes is):
    L = L_cls + multi-label soft margin( GAP(shared maps), y_cluster ),   y_cluster_c = max_{k in c} y_k

Toy world (CPU, about 2 minutes):
    python train_cam.py --dataset toy --device cpu
    python train_cam.py --dataset toy --device cpu --clusters data/toy/clusters.json --out out/toy/cam_clusters
    python train_cam.py --dataset toy --device cpu --backbone deit_toy --out out/toy_deit/cam
VOC (one GPU; `torchrun --nproc_per_node 4 train_cam.py ...` for four):
    python train_cam.py --dataset voc --init data/resnet50-imagenet.pth
    python train_cam.py --dataset voc --backbone deit_s --init data/deit_small_patch16_224-cd65a155.pth \
        --out out/voc_deit/cam

Reads the images and their labels (derived from the masks); writes OUT/checkpoint.pt (S, optimizer,
epoch, args; resumed from if present), OUT/log.txt, OUT/args.json. The architecture and input size
chosen here travel in the checkpoint: later stages rebuild S from it.
"""
import torch
import torch.nn.functional as F

from semples import datasets, presets, runtime, train_loop
from semples.network import BACKBONES, DEITS, build_mask_generator

PRESETS = presets.of("train_cam")


def build_parser():
    # VOC/COCO: the CAM network CLIMS starts from, IRN's recipe (jiwoon-ahn/irn, step/train_cam.py): SGD, lr 0.1
    # (10x on the classifier), weight decay 1e-4, poly 0.9, batch 16, 5 epochs. IRN's PolyOptimizer hands the
    # weight decay to SGD's momentum slot, so it trains with (practically) no momentum; so do we.
    p = train_loop.add_flags(runtime.new_parser(__doc__), epochs=5, lr=0.1, batch_size=16)
    p.set_defaults(weight_decay=1e-4)
    p.add_argument("--optimizer", type=str, default="sgd", choices=("sgd", "adamw"),
                   help="sgd: IRN's recipe, --lr as given, poly 0.9; adamw: the trainer of (a) and (c), --lr scaled "
                        "by batch/512, cosine")
    p.add_argument("--head_lr_mult", type=runtime.positive_float, default=10.0,
                   help="lr multiplier of the 1x1 classifier(s) (IRN: 10)")
    p.add_argument("--init", type=str, default=None,
                   help="ImageNet weights: a torchvision state-dict file (ResNet), or the DeiT authors' file (deit_s: "
                        "deit_small_patch16_224-cd65a155.pth); none = random init")
    p.add_argument("--backbone", type=str, default="resnet50", choices=BACKBONES,
                   help="S: a ResNet CAM network (CLIMS's), or WeakTr's DeiT-S (deit_s; deit_toy: its small twin for "
                        "the toy world), with its own preset rows, NAME/deit (`--backbone deit_s --help` lists them)")
    p.add_argument("--output_stride", type=int, default=16, choices=(8, 16, 32),
                   help="output stride of a ResNet S (a DeiT's is its patch size)")
    p.add_argument("--size", type=runtime.positive_int, default=448, help="S input size (square)")
    p.add_argument("--augment", type=str, default="flip", choices=("flip", "deit"),
                   help="flip: resize to --size, random flip (IRN-like); deit: DeiT's crops, RandAugment and erasing "
                        "(WeakTr's; datasets.ClsDataset says how ours differs from timm's)")
    p.add_argument("--warmup_epochs", type=runtime.nonnegative_int, default=0,
                   help="--optimizer adamw: epochs of linear lr warm-up before the cosine (WeakTr: 5)")
    p.add_argument("--min_lr", type=runtime.nonnegative_float, default=0.0,
                   help="--optimizer adamw: where the cosine ends, not scaled by batch (WeakTr: 1e-5)")
    p.add_argument("--clusters", type=str, default=None,
                   help="category-cluster JSON (semples/clusters/voc.json, semples/clusters/coco.json, DATA/clusters.json "
                        "for the toy world): shared cluster maps with cluster-level supervision; none = off")
    return p


# ---------------- the objectives ----------------
def objective_deit(logits, y):
    """L_WeakTr: one multi-label soft margin per output of the DeiT S (class tokens, coarse CAM, fine CAM)."""
    terms = {name: F.multilabel_soft_margin_loss(o.float(), y)
             for name, o in zip(("L_cls_token", "L_coarse", "L_fine"), logits)}
    return sum(terms.values()), terms


def objective(out, y, clusters=None):
    """L_cls on the class maps; with `clusters` (class-index lists), `out` is (class maps, cluster maps) and
    L_cluster supervises each cluster's shared map with its cluster label (present if any member is)."""
    cams, shared = out if clusters else (out, None)
    L_cls = F.multilabel_soft_margin_loss(cams.float().mean((2, 3)), y)
    if shared is None:
        return L_cls, {"L_cls": L_cls}
    y_cluster = torch.stack([y[:, members].amax(1) for members in clusters], 1)
    L_cluster = F.multilabel_soft_margin_loss(shared.float().mean((2, 3)), y_cluster)
    return L_cls + L_cluster, {"L_cls": L_cls, "L_cluster": L_cluster}
# ------------------------------------------------


def main(args):
    runtime.seed_everything(args.seed)  # before any weight is initialised
    names = datasets.read_class_names(args.data, args.dataset)
    clusters = None
    if args.clusters:
        args.cluster_groups = datasets.read_clusters(args.clusters, names)  # in args: a changed file is not resumed
        clusters = [[names.index(c) for c in members] for members in args.cluster_groups.values()]
    S = build_mask_generator(args.backbone, len(names), args.output_stride, args.init, clusters)

    if args.backbone in DEITS:
        train_loop.train(args, lambda x, y, out: objective_deit(out, y), "cam", S=S, outputs={"logits": True})
    else:
        train_loop.train(args, lambda x, y, out: objective(out, y, clusters), "cam", S=S,
                         outputs={"cluster_maps": True} if clusters else None)


if __name__ == "__main__":
    runtime.run_cli(main, build_parser(), PRESETS)
