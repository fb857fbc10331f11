"""The library the stage scripts share. Each module holds one kind of thing:

    presets     every per-dataset setting of every stage, in one table
    method      the method: CLIP side, masked samples, L_match (Eq. 1), L_prompt (Eq. 2), L_refine (Eq. 3), prompts
    network     the mask generator S: a ResNet CAM network (backbones, category clusters) or WeakTr's DeiT
    deit        WeakTr's DeiT-S: class tokens, conv head, attention fusion, fine CAM; its weight files
    train_loop  the one training loop of S (the CAM network, stages a and c hand it their objective)
    cams        multi-scale CAMs, CAM files, the background-threshold pseudo mask, the dense CRF
    metrics     confusion matrix, mIoU, the threshold sweep over CAM files
    datasets    reading data in VOC layout: class and split lists, images, masks, labels
    runtime     command line, seeding, device and torchrun, atomic files, checkpoints, logs
"""
