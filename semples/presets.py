"""Every per-dataset setting of every stage, in one table.

A stage's argparse defaults are the paper's VOC values (or the authors' release's, where the paper is
silent); `--dataset NAME` then applies this table's row for NAME, and a flag given on the command line wins.
So a row holds only what differs from those defaults. COCO's values are the paper's; every toy value was
measured on the toy world, each with its reason here and its measurement in docs/toy.md (section named).
A row "NAME/deit" is applied on top of NAME's when S is a DeiT (train_cam.py --backbone deit_s / deit_toy):
WeakTr's recipe. Stages (a)-(c) need no such row: the release's values (the VOC defaults) are the DeiT S's.

`python -m semples.presets` prints the table.
"""
# Where each dataset lives and which CLIP judges it; every stage and tool starts from these. Paths under
# data/ and out/ are the repository's, wherever a script runs from; "{data}" stands for the run's --data.
DATASETS = {
    "voc": dict(data="data/VOCdevkit/VOC2012", clip="ViT-B/32"),
    "coco": dict(data="data/coco", clip="ViT-B/32"),
    "toy": dict(data="data/toy", clip="{data}/tiny_clip.pt"),
}

# Values stages (a) and (c) share, so that `train_refine.py --lambda_refine 0` is stage (a)'s objective and
# schedule trained on (the control).
MATCHING = {
    "coco": dict(lambda_b=0.75, lr=5e-6),  # paper, COCO
    "toy": dict(
        batch_size=32,  # the toy world has 2,000 images: more steps per epoch than at 64
        epochs=20,  # 6 -> 20: stage (a) +1.6 -> +2.3 seed mIoU over the CAM network, 3 seeds (docs/toy.md, "Epochs")
        lr=0.05,  # at the paper's lr the head barely moves: +0.3 seed mIoU in 6 epochs (docs/toy.md, "Learning rate")
        lambda_b=1.2,  # the tiny CLIP scores backgrounds 0.2-0.5 with their class text (docs/toy.md, "lambda_b")
        lambda_area=0.75,  # without it, at a toy lr L_match finds wrong masks (docs/toy.md, "Area term")
        workers=1,  # 2 cores: one loader process beside the training one
        cache_features=True,  # the frozen backbone once per (image, flip): stage (a) 225 s -> 152 s, same result
    ),
}

# stage -> dataset -> {flag: value}; "voc" rows hold paths (the argparse defaults are VOC's values)
STAGES = {
    "train_cam": {
        "voc": dict(out="out/voc/cam"),
        "coco": dict(out="out/coco/cam"),
        # Random weights, no ImageNet on the toy world: a tiny S, trained with the AdamW of (a) and (c)
        # (docs/toy.md, "The CAM network").
        "toy": dict(out="out/toy/cam", backbone="tiny", output_stride=8, size=96, batch_size=32, epochs=6, lr=0.032,
                    workers=1, optimizer="adamw", head_lr_mult=1.0, weight_decay=0.03),
        # WeakTr's CAM network (hustvl/WeakTr): AdamW 6e-4 x batch/512, weight decay 0.03 on every parameter, 60
        # epochs, 5 of warm-up, cosine down to 1e-5, batch 64, 224 crops with DeiT's augmentation
        "voc/deit": dict(out="out/voc_deit/cam", size=224, optimizer="adamw", lr=6e-4, weight_decay=0.03, epochs=60,
                         batch_size=64, head_lr_mult=1.0, warmup_epochs=5, min_lr=1e-5, augment="deit"),
        "coco/deit": dict(out="out/coco_deit/cam", size=224, optimizer="adamw", lr=2e-4,  # WeakTr's COCO lr
                          weight_decay=0.03, epochs=60, batch_size=64, head_lr_mult=1.0, warmup_epochs=5, min_lr=1e-5,
                          augment="deit"),
        # The toy's small DeiT from random weights (no ImageNet here), with WeakTr's schedule shape
        "toy/deit": dict(out="out/toy_deit/cam", backbone="deit_toy", epochs=15, lr=0.016, warmup_epochs=1,
                         augment="flip"),
    },
    "train_match": {
        "voc": dict(out="out/voc/match", init="out/voc/cam/checkpoint.pt"),
        "coco": dict(out="out/coco/match", init="out/coco/cam/checkpoint.pt", **MATCHING["coco"]),
        "toy": dict(out="out/toy/match", init="out/toy/cam/checkpoint.pt", **MATCHING["toy"]),
    },
    "train_prompt": {
        "voc": dict(match="out/voc/match/checkpoint.pt", out="out/voc/prompt"),
        "coco": dict(match="out/coco/match/checkpoint.pt", out="out/coco/prompt", lambda_T=0.01),  # paper, COCO
        "toy": dict(match="out/toy/match/checkpoint.pt", out="out/toy/prompt",
                    epochs=30,  # 22 s on the toy world; no sweep on record (docs/toy.md, "Stage (b)")
                    prompt_length=8,  # the tiny CLIP's positions past ~15 never trained (docs/toy.md, "Stage (b)")
                    workers=1,
                    lambda_T=1.0,  # at 0.02 the tiny CLIP's prompts stay on the class text (docs/toy.md, "Stage (b)")
                    clip_grad=1.0),  # cosines near 0 spike L_prompt^T's gradient (docs/toy.md, "Gradient clipping")
    },
    "train_refine": {
        "voc": dict(out="out/voc/refine", init="out/voc/match/checkpoint.pt", prompts="out/voc/prompt/prompts.pt",
                    lambda_refine=0.05),  # the default, here too because tools/ablate.py reads every dataset's
        "coco": dict(out="out/coco/refine", init="out/coco/match/checkpoint.pt", prompts="out/coco/prompt/prompts.pt",
                     lambda_refine=0.2, lambda_T=0.01, **MATCHING["coco"]),  # paper, COCO
        "toy": dict(out="out/toy/refine", init="out/toy/match/checkpoint.pt", prompts="out/toy/prompt/prompts.pt",
                    lambda_refine=0.8,  # 1.6 and 4 trim boat's thin sail from the masks (docs/toy.md, "lambda")
                    prompt_length=8, lambda_T=1.0,  # --joint (Table 6): stage (b)'s toy values
                    **MATCHING["toy"]),
    },
    "make_pseudo": {
        "voc": dict(checkpoint="out/voc/refine/checkpoint.pt", out="out/voc/pseudo"),
        "coco": dict(checkpoint="out/coco/refine/checkpoint.pt", out="out/coco/pseudo",
                     scales="1.0,0.8,1.2",  # the release's COCO scales
                     store_scale=0.5),  # COCO's 82k CAM files: ~27 GB at half resolution instead of ~100 GB
        "toy": dict(checkpoint="out/toy/refine/checkpoint.pt", out="out/toy/pseudo",
                    batch_size=64),  # 96 px images: more per forward pass on CPU
    },
    "train_seg": {
        "voc": dict(masks="out/voc/pseudo/masks", out="out/voc/seg"),
        "coco": dict(masks="out/coco/pseudo/masks", out="out/coco/seg", iters=100000),  # the release's COCO schedule
        # Random init on the toy world: a small ResNet with trainable BN and one lr for head and body (a 10x head
        # lr destabilises training from scratch: 24 vs 43 mIoU; docs/toy.md, "The segmenter").
        "toy": dict(masks="out/toy/pseudo/masks", out="out/toy/seg", backbone="tiny", crop=64, batch_size=16,
                    iters=1000, lr=0.02, head_lr_mult=1.0, freeze_bn=False, test_scales="1.0", workers=1),
    },
    "eval_miou": {},
    # tools/
    "report": {"voc": dict(out="out/voc"), "coco": dict(out="out/coco"), "toy": dict(out="out/toy")},
    "ablate": {d: dict(out=f"out/{d}_ablate") for d in DATASETS},  # + lambda_refine, below
    "compare_clusters": {d: dict(out=f"out/{d}_clusters") for d in DATASETS},
    "bench": {"toy": dict(steps=2, images=4, pairs=64)},
}

# make_pseudo.py's background threshold where --bg_threshold is not given: a constant, or "mass" (each class's
# own, read off its CAM: make_pseudo.py). It belongs to S's CAMs, so it is picked by the family of the S that made
# them (read from the checkpoint, or the CAM files' record).
BG_THRESHOLD = {
    "resnet": {"voc": 0.15, "coco": 0.15,  # IRN's and CLIMS's CAM threshold for the ResNet-50 CAM family
               # each class's own, off its CAM: a constant (0.45 before) lowered the masks of stage (c) on the
               # second generator's world, whose best constant is 0.3-0.35, not 0.5-0.55 (docs/toy.md, "Threshold")
               "toy": "mass"},
    "deit": {"voc": 0.43, "coco": 0.42,  # WeakTr's documented values for its DeiT-S CAMs
             "toy": 0.43},  # WeakTr's VOC value, not swept on the toy world
}


def bg_threshold(dataset, backbone):
    """The background threshold of CAMs made by an S with this backbone (BG_THRESHOLD)."""
    return BG_THRESHOLD["deit" if backbone.startswith("deit") else "resnet"][dataset]


for _d in DATASETS:  # the ablation's "all" row is stage (c) at its preset lambda
    STAGES["ablate"][_d]["lambda_refine"] = STAGES["train_refine"][_d]["lambda_refine"]


def of(stage):
    """The presets of one stage or tool: {dataset: {flag: value}}, the dataset's locations included."""
    rows = {name: {**DATASETS[name], **STAGES[stage].get(name, {})} for name in DATASETS}
    return {**rows, **{name: row for name, row in STAGES[stage].items() if "/" in name}}  # "NAME/deit": on top of NAME


if __name__ == "__main__":
    for stage, rows in STAGES.items():
        for dataset, values in rows.items():
            print(f"{stage:16s} {dataset:5s} " + " ".join(f"--{k} {v}" for k, v in values.items()))
    for family, values in BG_THRESHOLD.items():
        print(f"{'make_pseudo':16s} {family} S, --bg_threshold: " + ", ".join(f"{d} {v}" for d, v in values.items()))
