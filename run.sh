#!/usr/bin/env bash
# SemPLeS end to end: CAM network -> (a) -> (b) -> (c) -> CAMs -> pseudo masks -> segmenter -> mIoU table.
#
#   bash run.sh                        # the toy world on CPU (generates data/toy + tiny CLIP if absent)
#   bash run.sh --toy DIR --clip FILE  # any small VOC-layout folder with class_names.txt, any CLIP file; toy presets
#   bash run.sh --data DIR --clip FILE --init data/resnet50-imagenet.pth --seg_init data/resnet101-imagenet.pth
#       # your own VOC-layout folder with the VOC recipe (the stages get --dataset voc --data DIR: 448 px S,
#       # ResNet-50 CAM network, VOC thresholds; --clip FILE, required: a ViT-B/32-sized CLIP in OpenAI's format);
#       # class names from DIR/class_names.txt (else VOC's 20); the lists as for --toy DIR (train.txt, val.txt,
#       # train_aug.txt if there is one); OUT defaults to out/data_NAME (NAME: DIR's folder name)
#   bash run.sh --voc data/VOCdevkit/VOC2012 --clip ViT-B/32 \
#       --init data/resnet50-imagenet.pth --seg_init data/resnet101-imagenet.pth --gpus 4
#   bash run.sh --coco data/coco --clip ViT-B/32 --init ... --seg_init ... --gpus 8
#   bash run.sh --voc data/VOCdevkit/VOC2012 --clip ViT-B/32 --backbone deit_s \
#       --init data/deit_small_patch16_224-cd65a155.pth --seg_init data/resnet101-imagenet.pth --gpus 4
#       # the paper's S, WeakTr's DeiT-S (its recipe: train_cam.py's "voc/deit" preset); OUT out/voc_deit_s
#   bash run.sh --backbone deit_toy      # the toy world with a small DeiT of the same design; OUT out/toy_deit_toy
#   bash run.sh --seed 1 --out out/toy_seed1   # another pipeline seed
#   bash run.sh --clusters data/toy/clusters.json --out out/toy_clusters   # CAM network with category clusters
#   bash run.sh --no-seg               # stop after the seeds and pseudo masks of the train list (no segmenter)
#   bash run.sh --dry-run ...          # the checks below, then each step's command (or 'done, skipped'); runs none
#
# Checks before any step: each file given exists (--init, --seg_init, and --clip where it is a file: a path
# ending in .pt/.pth, or one that exists; ViT-B/32 is a model name), a user's --toy folder has its CLIP, the
# segmenter of --voc/--coco/--data has ImageNet weights (--seg_init), and the dense CRF imports (pydensecrf2);
# else one line saying what is missing, exit 2. Then it prints the disk the CAM files will take (the train
# list's at three stages and the pseudo masks' list, at make_pseudo.py's measured size per image) against
# what OUT's disk has free, with a warning where it is short.
#
# Stops at the first failure. A finished step leaves OUT/.done/STEP holding the command that made it, a key
# of its inputs (the dataset's files, the CLIP and --init files) and one of its code (the scripts it runs and
# the shared modules); it is skipped on the next run only if all three are the same (else it is redone from
# scratch, and so is every step after it that reads what it made: a redone evaluation, eval_* or seg_eval,
# redoes only itself and the report). An interrupted training step resumes from its own checkpoint.
# Extra flags for one stage: CAM_ARGS, MATCH_ARGS, PROMPT_ARGS, REFINE_ARGS, PSEUDO_ARGS, SEG_ARGS, TOY_ARGS.
# Writes OUT/results.json (every number of the printed table) and prints the table; then OUT/report.html (tools/report.py:
# results, loss curves, CAMs per stage, the learned prompts' region maps and nearest words) and prints its path.
# The segmenter's row states its protocol: val predicted multi-scale + flip (SEG_ARGS --test_scales; the toy
# preset has one scale), without and then with the dense CRF (train_seg.py --checkpoint --crf, OUT/seg_crf),
# as papers report it: two rows, results.json's segmenter_val_miou and segmenter_val_miou_crf.
#
# The background threshold of the pseudo masks on data of your own (--data, --toy DIR): the preset's (VOC
# 0.15; a DeiT S 0.43; toy: mass, each class's own read off its CAM, make_pseudo.py), chosen without ground
# truth. To fit a constant to your data, label a small subset (its ids in DIR/ImageSets/Segmentation/NAME.txt,
# its masks in DIR/SegmentationClass) and, after a run (--no-seg is enough), sweep the threshold over the
# subset's CAMs:
#   python make_pseudo.py --dataset voc --data DIR --split NAME --checkpoint OUT/refine/checkpoint.pt \
#       --cams_only --out OUT/subset
#   python eval_miou.py --dataset voc --data DIR --split NAME --cams OUT/subset/cams    # ends 'best threshold: T'
# then rerun with PSEUDO_ARGS="--bg_threshold T": the pseudo masks, the segmenter and the evaluations are
# redone, the CAM network and stages (a)-(c) are not. (--toy DIR: --dataset toy.)
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")"
HERE=$PWD
from_caller() {  # a path the user typed, as their shell meant it: run.sh works from the repository, so a relative
  # path is the caller's folder's (unchanged when run.sh is called from the repository itself, so keys stay put)
  case "$1" in ""|/*) printf '%s' "$1" ;; *) [ "$CALLER" = "$HERE" ] && printf '%s' "$1" || printf '%s/%s' "$CALLER" "$1" ;; esac
}

if [ -n "${PYTHON:-}" ]; then  # as given: a wrong PYTHON must not quietly become another python
  case "$PYTHON" in */*) PY=$(from_caller "$PYTHON") ;; *) PY=$(command -v "$PYTHON" || true) ;; esac
  [ -n "$PY" ] && [ -x "$PY" ] || {
    echo "run.sh: PYTHON=$PYTHON is not an executable; point it at a python with the requirements, or unset it" >&2
    exit 2; }
else
  PY=.venv/bin/python
  [ -x "$PY" ] || PY=python3
fi
DATASET=toy DATA="" CLIP="" INIT="" SEG_INIT="" GPUS=1 OUT="" DEVICE="" SEED=504 CLUSTERS="" SEG=1 USER_DATA="" DRY=0
BACKBONE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --voc|--coco|--toy|--data|--clip|--init|--seg_init|--gpus|--out|--device|--seed|--clusters|--backbone)
      [ $# -ge 2 ] || { echo "run.sh: $1 needs a value (see bash run.sh --help)" >&2; exit 2; } ;;
  esac
  case "$1" in
    --voc) DATASET=voc DATA=$2; shift 2 ;;
    --coco) DATASET=coco DATA=$2; shift 2 ;;
    --toy) DATASET=toy DATA=$2; shift 2 ;;
    --data) DATASET=voc DATA=$2 USER_DATA=1; shift 2 ;;
    --clip) CLIP=$2; shift 2 ;;
    --init) INIT=$2; shift 2 ;;
    --seg_init) SEG_INIT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --clusters) CLUSTERS=$2; shift 2 ;;
    --backbone) BACKBONE=$2; shift 2 ;;
    --no-seg) SEG=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see bash run.sh --help)" >&2; exit 2 ;;
  esac
done
# paths the user gave are the caller's (defaults, set below, are the repository's); --clip only where it is a file
DATA=$(from_caller "$DATA") INIT=$(from_caller "$INIT") SEG_INIT=$(from_caller "$SEG_INIT") OUT=$(from_caller "$OUT")
CLUSTERS=$(from_caller "$CLUSTERS")
case "$CLIP" in *.pt|*.pth) CLIP=$(from_caller "$CLIP") ;; *) [ -z "$CLIP" ] || [ ! -e "$CALLER/$CLIP" ] || CLIP=$(from_caller "$CLIP") ;; esac
torch_error=$("$PY" -c "import torch, torchvision, numpy, PIL" 2>&1) || {
  echo "run.sh: $PY cannot import the requirements ($(printf '%s\n' "$torch_error" | tail -n 1)); install them" \
    "(README, Install) or set PYTHON to a python that has them" >&2; exit 2; }
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --gpus must be a positive integer, got '$GPUS'" >&2; exit 2; }
if [ -n "$BACKBONE" ]; then  # train_cam.py's choices, checked now rather than after the toy world is made
  backbones=$("$PY" -c "from semples.network import BACKBONES; print(' '.join(BACKBONES))")
  [[ " $backbones " == *" $BACKBONE "* ]] || {
    echo "run.sh: --backbone $BACKBONE unknown; choose from: $backbones" >&2; exit 2; }
fi
[[ "$SEED" =~ ^[0-9]+$ ]] || { echo "run.sh: --seed must be a non-negative integer, got '$SEED'" >&2; exit 2; }
[ -n "$DATA" ] || DATA=data/$DATASET
if [ -n "$USER_DATA" ]; then  # the VOC recipe on a user's folder: its CLIP is a file they have
  [ -n "$CLIP" ] || { echo "run.sh: --data $DATA needs --clip FILE (a ViT-B/32-sized CLIP in OpenAI's format, e.g." \
    "~/.cache/clip/ViT-B-32.pt; --toy DIR runs a folder with the toy presets instead)" >&2; exit 2; }
  [ -f "$CLIP" ] || { echo "run.sh: --data $DATA needs --clip FILE: $CLIP is not a file" >&2; exit 2; }
  [ -n "$OUT" ] || OUT=out/data_$(basename "$(cd "$DATA" 2>/dev/null && pwd || echo "$DATA")")
fi
[ -n "$OUT" ] || OUT=out/$DATASET${BACKBONE:+_$BACKBONE}
if [ "$DATASET" = toy ]; then
  # Generate only where the folder is (or will be) a make_toy world: never write into a user's dataset.
  if [ ! -e "$DATA" ] || [ -f "$DATA/toy_meta.json" ] || [ -z "$(ls -A "$DATA" 2>/dev/null)" ]; then
    MAKE_TOY=1
  elif [ ! -f "$DATA/class_names.txt" ]; then
    echo "run.sh: --toy $DATA is neither a make_toy world nor a VOC-layout folder with class_names.txt" >&2; exit 2
  fi
  [ -n "$CLIP" ] || CLIP=$DATA/tiny_clip.pt
  [ -n "$DEVICE" ] || DEVICE=cpu
else
  [ -n "$CLIP" ] || CLIP=ViT-B/32
  [ -d "$DATA" ] || { echo "run.sh: dataset folder $DATA not found (see README 'Data')" >&2; exit 2; }
fi
# The list S, the prompts and the segmenter train on: train_aug; a --toy folder without one (VOC's own layout
# has train.txt and val.txt only) trains on train, the list the seeds are scored on. A user's folder is told
# what it lacks now, not after the stages.
TRAIN_LIST=train_aug SPLIT_FLAG=()
if [ -n "$USER_DATA" ] || { [ "$DATASET" = toy ] && [ -z "${MAKE_TOY:-}" ]; }; then
  LISTS=$DATA/ImageSets/Segmentation
  [ -f "$LISTS/train.txt" ] || {
    echo "run.sh: $LISTS has no train.txt (the list the seeds and pseudo masks are scored on): add it" >&2; exit 2; }
  [ "$SEG" = 0 ] || [ -f "$LISTS/val.txt" ] || {
    echo "run.sh: $LISTS has no val.txt (the list the segmenter is scored on): add it, or pass --no-seg" >&2; exit 2; }
  if [ ! -f "$LISTS/train_aug.txt" ]; then
    TRAIN_LIST=train SPLIT_FLAG=(--split train)
    echo "run.sh: $LISTS has no train_aug.txt: training on train.txt"
  fi
fi
# DATA/clusters.json of a toy world is written by its make_toy step: it may not exist yet
[ -z "$CLUSTERS" ] || [ -f "$CLUSTERS" ] || { [ -n "${MAKE_TOY:-}" ] && [ "$CLUSTERS" = "$DATA/clusters.json" ]; } || {
  echo "run.sh: --clusters file $CLUSTERS not found (semples/clusters/voc.json, semples/clusters/coco.json, DATA/clusters.json)" >&2
  exit 2; }
# The files given, checked now rather than by the step that reads them (hours in, on VOC): one line, exit 2.
need_file() {  # need_file FLAG PATH WHAT
  [ -f "$2" ] || { echo "run.sh: $1 file $2 not found ($3)" >&2; exit 2; }
}
[ -z "$INIT" ] || need_file --init "$INIT" "the CAM network's ImageNet weights"
[ -z "$SEG_INIT" ] || need_file --seg_init "$SEG_INIT" "the segmenter's ImageNet weights"
if [ -n "${MAKE_TOY:-}" ] && [ "$CLIP" = "$DATA/tiny_clip.pt" ]; then
  :  # the toy world's tiny CLIP: made below
elif [[ "$CLIP" == *.pt || "$CLIP" == *.pth || -e "$CLIP" ]]; then  # a file; else a model name (ViT-B/32)
  need_file --clip "$CLIP" "a CLIP checkpoint in OpenAI's format$([ "$DATASET" = toy ] && echo ": pass --clip FILE")"
fi
if [ "$DATASET" != toy ] && [ "$SEG" = 1 ] && [ -z "$SEG_INIT" ] && [[ " ${SEG_ARGS:-} " != *" --init "* ]] &&
   [[ " ${SEG_ARGS:-} " != *" --no-freeze_bn "* ]]; then
  echo "run.sh: the segmenter (DeepLab-v2 ResNet-101, frozen BatchNorm) needs ImageNet weights: pass --seg_init" \
    "FILE (README 'Data'), or --no-seg to stop before it" >&2; exit 2
fi
# The dense CRF makes every pseudo mask: without pydensecrf2 the run would stop after the CAM network's training.
crf_error=$("$PY" -c "import pydensecrf.densecrf" 2>&1) || {
  echo "run.sh: the dense CRF does not import (import pydensecrf.densecrf: $(printf '%s\n' "$crf_error" | tail -n 1));" \
    "install it: $PY -m pip install pydensecrf2 (requirements.txt)" >&2; exit 2; }
[ -n "$DEVICE" ] || DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

COMMON=(--dataset "$DATASET" --data "$DATA" --device "$DEVICE" --seed "$SEED")
TRAIN=("$PY")
[ "$GPUS" -gt 1 ] && TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
mkdir -p "$OUT/.done"
REDO=0 EVAL_REDONE=0
# Steps whose outputs no later step reads (the table and the report do): redoing one redoes none after it.
EVALS=" eval_cam eval_match eval_refine seg_eval seg_crf_eval "

disk_check() {  # the disk the CAM files will take, against what OUT's disk has free (a warning where short)
  "$PY" - "$OUT" "$DATA" "$DATASET" "${MAKE_TOY:+world}${USER_DATA:+user}" "$SEG" "$TRAIN_LIST" "${PSEUDO_ARGS:-}" <<'EOF'
import os, shutil, sys
out, data, dataset, kind, seg, train_list, pseudo_args = sys.argv[1:8]
if kind == "" and dataset == "toy":
    kind = "user"  # --toy DIR of one's own (not a make_toy world)
lists = os.path.join(data, "ImageSets", "Segmentation")
def ids(split):
    with open(os.path.join(lists, f"{split}.txt"), encoding="utf-8-sig") as f:
        return [line.split()[0] for line in f if line.strip()]
try:
    train = ids("train")
    pseudo = ids(train_list) if seg == "1" else []
except OSError:
    print("== disk: the lists are not there yet: no estimate of the CAM files' size")
    sys.exit(0)
# make_pseudo.py's measured sizes per image: VOC 0.35 MB (full size, 500x375), COCO 0.33 MB (--store_scale 0.5),
# the toy world's 17 KB (96 px). A folder of one's own (--toy DIR, --data DIR): VOC's size per pixel at the
# mean size of its first images. The release's .npy format (--cam_format npy) is uncompressed float32 at full
# size: ~3.2x VOC's size (COCO: ~11x its half-size npz).
mb = {"voc": 0.35, "coco": 0.33, "toy": 0.017}[dataset]
if kind == "user":
    from PIL import Image
    sizes = []
    for i in train[:20]:
        name = os.path.splitext(os.path.basename(i))[0]
        for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
            path = os.path.join(data, "JPEGImages", name + ext)
            if os.path.exists(path):
                with Image.open(path) as im:
                    sizes.append(im.size[0] * im.size[1])
                break
    if sizes:
        mb = 0.35 * sum(sizes) / len(sizes) / (500 * 375)
flags = pseudo_args.split()
if "--cam_format=npy" in flags or any(a == "--cam_format" and b == "npy" for a, b in zip(flags, flags[1:])):
    mb *= 11 if dataset == "coco" else 3.2
need, free = (3 * len(train) + len(pseudo)) * mb * 2**20, shutil.disk_usage(out).free
def human(n):
    return next(f"{n / 2**e:.{d}f} {u}" for e, u, d in ((30, "GB", 1), (20, "MB", 0), (10, "KB", 0)) if n >= 2**e or u == "KB")
what = f"3 x {len(train)} train" + (f" + {len(pseudo)} {train_list}" if pseudo else "")
print(f"== disk: the CAM files will take ~{human(need)} ({what} images x ~{human(mb * 2**20)}); {human(free)} free "
      f"on the disk of {out}")
if need > free:
    print(f"run.sh: warning: the disk of {out} has {human(free)} free, the CAM files need ~{human(need)}: free space, "
          "pass another --out, or store them smaller (PSEUDO_ARGS='--store_scale 0.5')", file=sys.stderr)
EOF
}

code_key() {  # code_key command...: a hash of the code a step runs: the scripts its command names (a `seeds`
  # step: make_pseudo.py and eval_miou.py) and the modules they share. Part of the step's key, so that an edited
  # loss or preset value redoes its step (and every step after it) instead of reusing a stale output.
  local files=(semples/*.py clip/*.py) word
  for word in "$@"; do
    case "$word" in
      *.py) [ -f "$word" ] && files+=("$word") ;;
      seeds) files+=(make_pseudo.py eval_miou.py) ;;
    esac
  done
  cat "${files[@]}" | sha256sum | cut -c1-16
}
step() {  # step NAME DIR command...: run unless done with the same command, inputs and code; a redone step
  # redoes the rest (an evaluation, one of EVALS, only the report)
  local name=$1 dir=$2; shift 2
  local want="$*${INPUTS:+ [inputs $INPUTS]} [code $(code_key "$@")]" redo=$REDO
  [ "$name" != report ] || [ "$EVAL_REDONE" = 0 ] || redo=1
  if [ "$redo" = 0 ] && [ -f "$OUT/.done/$name" ] && [ "$(head -n 1 "$OUT/.done/$name")" = "$want" ]; then
    echo "== $name: done, skipped"; return
  fi
  if [[ "$EVALS" == *" $name "* ]]; then EVAL_REDONE=1; else REDO=1; fi
  if [ "$DRY" = 1 ]; then echo "== $name (dry run, not run): $*"; return; fi
  if [ -f "$OUT/.done/$name" ]; then  # made by another command, or from an input that was redone
    echo "== $name: its command, its inputs or an earlier step changed, redoing it from scratch"
    rm -f "$OUT/.done/$name"
    [ -z "$dir" ] || rm -rf "$dir"
  fi
  echo "== $name: $*"
  local t0=$SECONDS
  if [ "$GPUS" -gt 1 ]; then  # torchrun buries a stage's one-line error in its failure report: repeat it last
    local err="$OUT/.done/$name.stderr"
    "$@" 2> >(tee "$err" >&2) || { local rc=$?; sleep 1
      grep -h ': error: ' "$err" | tail -n 1 >&2 || true; exit $rc; }
    rm -f "$err"
  else
    "$@"
  fi
  printf '%s\n%s\n' "$want" "$((SECONDS - t0))" > "$OUT/.done/$name.tmp" && mv "$OUT/.done/$name.tmp" "$OUT/.done/$name"
}
seeds() {  # seeds NAME CHECKPOINT [make_pseudo.py flags]: CAMs of the train list, threshold sweep (seed mIoU), pseudo
  # masks, mIoU. The flags (PSEUDO_ARGS) are in the step's command, so that other flags redo it.
  local name=$1 ckpt=$2; shift 2
  "$PY" make_pseudo.py "${COMMON[@]}" --checkpoint "$ckpt" --split train --out "$OUT/$name" "$@"
  "$PY" eval_miou.py --dataset "$DATASET" --data "$DATA" --split train --cams "$OUT/$name/cams" \
    --t_start 0.05 --t_end 0.95 --json "$OUT/$name/seed.json" > "$OUT/$name/seed_eval.txt"
  "$PY" eval_miou.py --dataset "$DATASET" --data "$DATA" --split train --pred "$OUT/$name/masks" \
    --json "$OUT/$name/mask.json" > "$OUT/$name/mask_eval.txt"
}

# shellcheck disable=SC2086
{
TOY_JOB=""
if [ -n "${MAKE_TOY:-}" ] && [ "$DRY" = 1 ]; then
  echo "== toy (dry run, not run): $PY tools/make_toy.py --out $DATA ${TOY_ARGS:-}"
elif [ -n "${MAKE_TOY:-}" ]; then  # every time: make_toy reuses a world made with its current settings (seconds)
  echo "== toy: $PY tools/make_toy.py --out $DATA ${TOY_ARGS:-}"  # and remakes one made by an older make_toy
  "$PY" tools/make_toy.py --out "$DATA" --part dataset ${TOY_ARGS:-}
  # The tiny CLIP trains on one thread (minutes) while the CAM network, which needs no CLIP, trains too: the
  # same files; on 2 cores the two slow each other down (beside_clip, below, eases it). Its output is shown once done.
  "$PY" tools/make_toy.py --out "$DATA" --part clip ${TOY_ARGS:-} > "$OUT/make_toy.log" 2>&1 &
  TOY_JOB=$!
  trap '[ -z "$TOY_JOB" ] || kill "$TOY_JOB" 2>/dev/null || true' EXIT  # run.sh stopped early: stop it too
fi
disk_check
inputs() {  # what the steps read besides their command: the dataset's files (but a tiny_clip.pt in it, which
  # may still be training) and the given files (names, sizes, times); part of each step's key, so an edited
  # mask or another CLIP file redoes the steps
  (find "$DATA" -type f ! -name 'tiny_clip.pt*' -printf '%P %s %T@\n' 2>/dev/null | LC_ALL=C sort
   for f in "$@"; do [ -f "$f" ] && stat -c '%n %s %Y' "$f"; done; true) | sha256sum | cut -c1-16
}
INPUTS=$(inputs "$INIT" "$CLUSTERS")  # the CAM network's
INIT_FLAG=(); [ -n "$INIT" ] && INIT_FLAG=(--init "$INIT")
SEG_INIT_FLAG=(); [ -n "$SEG_INIT" ] && SEG_INIT_FLAG=(--init "$SEG_INIT")
CLUSTER_FLAG=(); [ -n "$CLUSTERS" ] && CLUSTER_FLAG=(--clusters "$CLUSTERS")
BACKBONE_FLAG=(); [ -n "$BACKBONE" ] && BACKBONE_FLAG=(--backbone "$BACKBONE")  # later stages: S's checkpoint
CAM=$OUT/cam/checkpoint.pt MATCH=$OUT/match/checkpoint.pt

beside_clip() {  # beside_clip command...: while the tiny CLIP trains in the background, the command's idle OpenMP
  # threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE; the same numbers, bit for bit): both run faster
  # on 2 cores; alone, a stage runs slower with it, so only here (docs/log.md has the timings).
  if [ -n "$TOY_JOB" ]; then OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} "$@"; else "$@"; fi
}
beside_clip step cam "$OUT/cam" "${TRAIN[@]}" train_cam.py "${COMMON[@]}" --out "$OUT/cam" "${SPLIT_FLAG[@]}" \
  "${INIT_FLAG[@]}" "${CLUSTER_FLAG[@]}" "${BACKBONE_FLAG[@]}" ${CAM_ARGS:-}
beside_clip step eval_cam "$OUT/eval_cam" seeds eval_cam "$CAM" ${PSEUDO_ARGS:-}
if [ -n "$TOY_JOB" ]; then
  wait "$TOY_JOB" || { cat "$OUT/make_toy.log"; echo "run.sh: tools/make_toy.py --part clip failed (above)" >&2; exit 1; }
  TOY_JOB=""
  cat "$OUT/make_toy.log"
fi
INPUTS=$(inputs "$CLIP" "$INIT" "$SEG_INIT" "$CLUSTERS")  # the later steps' (the CLIP is made by now)
step match "$OUT/match" "${TRAIN[@]}" train_match.py "${COMMON[@]}" --clip "$CLIP" --init "$CAM" --out "$OUT/match" \
  "${SPLIT_FLAG[@]}" ${MATCH_ARGS:-}
step eval_match "$OUT/eval_match" seeds eval_match "$MATCH" ${PSEUDO_ARGS:-}
step prompt "$OUT/prompt" "${TRAIN[@]}" train_prompt.py "${COMMON[@]}" --clip "$CLIP" --match "$MATCH" \
  --out "$OUT/prompt" "${SPLIT_FLAG[@]}" ${PROMPT_ARGS:-}
step refine "$OUT/refine" "${TRAIN[@]}" train_refine.py "${COMMON[@]}" --clip "$CLIP" --init "$MATCH" \
  --prompts "$OUT/prompt/prompts.pt" --out "$OUT/refine" "${SPLIT_FLAG[@]}" ${MATCH_ARGS:-} ${REFINE_ARGS:-}
step eval_refine "$OUT/eval_refine" seeds eval_refine "$OUT/refine/checkpoint.pt" ${PSEUDO_ARGS:-}
if [ "$SEG" = 1 ]; then
step pseudo "$OUT/pseudo" "$PY" make_pseudo.py "${COMMON[@]}" --checkpoint "$OUT/refine/checkpoint.pt" \
  --split "$TRAIN_LIST" --out "$OUT/pseudo" ${PSEUDO_ARGS:-}
step seg "$OUT/seg" "${TRAIN[@]}" train_seg.py "${COMMON[@]}" --masks "$OUT/pseudo/masks" --out "$OUT/seg" \
  "${SPLIT_FLAG[@]}" "${SEG_INIT_FLAG[@]}" ${SEG_ARGS:-}
step seg_eval "" "$PY" eval_miou.py --dataset "$DATASET" --data "$DATA" --split val --pred "$OUT/seg/pred" \
  --json "$OUT/seg/val.json"
# the same segmenter's val predictions with the dense CRF (train_seg.py's SEG_CRF), as papers report them
step seg_crf "$OUT/seg_crf" "${TRAIN[@]}" train_seg.py "${COMMON[@]}" --checkpoint "$OUT/seg/checkpoint.pt" --crf \
  --out "$OUT/seg_crf" ${SEG_ARGS:-}
step seg_crf_eval "" "$PY" eval_miou.py --dataset "$DATASET" --data "$DATA" --split val --pred "$OUT/seg_crf/pred" \
  --json "$OUT/seg_crf/val.json"
fi
}

if [ "$DRY" = 1 ]; then  # no table: nothing ran
  step report "$OUT/report" "$PY" tools/report.py --dataset "$DATASET" --data "$DATA" --out "$OUT" --clip "$CLIP" \
    --device "$DEVICE"
  exit 0
fi
"$PY" - "$OUT" "$DATASET" "$SEED" "$SEG" "$CLUSTERS" <<'EOF'
import json, os, re, sys
out, dataset, seed, seg, clusters = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
def read(path):
    with open(os.path.join(out, path)) as f:
        return json.load(f)
rows = {"cam": "CAM network", "a": "stage (a) only: L_match", "c": "SemPLeS (a)+(b)+(c)"}
folder = {"cam": "eval_cam", "a": "eval_match", "c": "eval_refine"}
res = {"dataset": dataset, "seed": seed, "clusters": clusters or None, "backbone": read("cam/args.json")["backbone"]}
for key in rows:
    s, m = read(f"{folder[key]}/seed.json"), read(f"{folder[key]}/mask.json")
    res[key] = {"seed_miou": round(s["miou"], 2), "seed_threshold": s["best_threshold"],
                "pseudo_miou": round(m["miou"], 2)}
res["segmenter_val_miou"] = round(read("seg/val.json")["miou"], 2) if seg else None  # None: --no-seg
res["segmenter_val_miou_crf"] = round(read("seg_crf/val.json")["miou"], 2) if seg else None  # the same + dense CRF
def test_scales():  # the scales the segmenter predicted val at, each with its flip: train_seg.py's log line
    with open(os.path.join(out, "seg_crf", "log.txt")) as f:
        said = re.findall(r"\(scales (\[[^\]]*\]) with flips, crf True\)", f.read())
    return json.loads(said[-1]) if said else None
res["segmenter_test_scales"] = test_scales() if seg else None
tmp = os.path.join(out, "results.json.tmp")
with open(tmp, "w") as f:
    json.dump(res, f, indent=1)
os.replace(tmp, os.path.join(out, "results.json"))
print(f"\nSemPLeS on {dataset}{'' if res['backbone'] in ('tiny', 'resnet50') else ', S ' + res['backbone']}, seed {seed}{', CAM network with clusters' if clusters else ''} (mIoU %; seeds at the best background threshold of a sweep, "
      "as papers report them; pseudo masks at the preset threshold)")
print(f"{'':34s} {'seed (CAM), train':>17s} {'pseudo mask, train':>19s}")
for key, name in rows.items():
    r = res[key]
    print(f"{name:34s} {r['seed_miou']:10.2f} t={r['seed_threshold']:<4.2f} {r['pseudo_miou']:19.2f}")
if seg:  # the protocol in the row's name: the scales, each with its flip, then the dense CRF
    scales = res["segmenter_test_scales"] or [0, 0]  # a log without the line: multi-scale, the default
    proto = "multi-scale + flip" if len(scales) > 1 else "flip" if scales == [1.0] else f"scale {scales[0]:g} + flip"
    for name, key in ((f"segmenter on pseudo masks, val ({proto})", "segmenter_val_miou"),
                      (f"segmenter on pseudo masks, val ({proto}) + CRF", "segmenter_val_miou_crf")):
        print(f"{name} {res[key]:{max(6, 71 - len(name))}.2f}")
else:
    print(f"{'segmenter on pseudo masks, val':34s} {'not run (--no-seg)':>37s}")
print(f"results: {os.path.join(out, 'results.json')}")
EOF

# The pictures and numbers of this run on one page (tools/report.py): read from OUT, redone when any step was.
step report "$OUT/report" "$PY" tools/report.py --dataset "$DATASET" --data "$DATA" --out "$OUT" --clip "$CLIP" --device "$DEVICE"
echo "report: $OUT/report.html"
