#!/usr/bin/env bash
# SemPLeS end to end: stages (a) -> (b) -> (c), CAMs -> pseudo masks, segmenter, mIoU table.
#
#   bash run.sh                        # the toy world on CPU (generates data + tiny CLIP if absent)
#   bash run.sh --voc data/VOCdevkit/VOC2012 --clip ViT-B/32 \
#       --init data/resnet50-imagenet.pth --seg_init data/resnet101-imagenet.pth --gpus 4
#   bash run.sh --coco data/coco --clip ViT-B/32 --init ... --seg_init ... --gpus 8
#
# Stops at the first failure. A finished step leaves OUT/.done/STEP and is skipped on the next run;
# an interrupted training step resumes from its own checkpoint. Extra flags for one stage can be
# passed through the environment: MATCH_ARGS, PROMPT_ARGS, REFINE_ARGS, PSEUDO_ARGS, SEG_ARGS, TOY_ARGS.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATASET=toy DATA="" CLIP="" INIT="" SEG_INIT="" GPUS=1 OUT="" DEVICE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --voc) DATASET=voc DATA=$2; shift 2 ;;
    --coco) DATASET=coco DATA=$2; shift 2 ;;
    --toy) DATASET=toy DATA=$2; shift 2 ;;
    --clip) CLIP=$2; shift 2 ;;
    --init) INIT=$2; shift 2 ;;
    --seg_init) SEG_INIT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see bash run.sh --help)" >&2; exit 2 ;;
  esac
done
[ -n "$DATA" ] || DATA=data/$DATASET
[ -n "$OUT" ] || OUT=out/$DATASET
if [ "$DATASET" = toy ]; then
  [ -n "$CLIP" ] || CLIP=$DATA/tiny_clip.pt
  [ -n "$DEVICE" ] || DEVICE=cpu
else
  [ -n "$CLIP" ] || CLIP=ViT-B/32
  [ -d "$DATA" ] || { echo "run.sh: dataset folder $DATA not found (see README 'Data')" >&2; exit 2; }
fi
[ -n "$DEVICE" ] || DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

COMMON=(--dataset "$DATASET" --data "$DATA" --device "$DEVICE")
TRAIN=("$PY")
[ "$GPUS" -gt 1 ] && TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
mkdir -p "$OUT/.done"

step() {  # step NAME command...: run once, mark done
  local name=$1; shift
  if [ -f "$OUT/.done/$name" ]; then echo "== $name: done, skipped"; return; fi
  echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  echo "$((SECONDS - t0))" > "$OUT/.done/$name"
}
miou() { grep -E '^mIoU: ' "$1" | tail -n 1 | awk '{print $2}'; }
best_t() { grep -E '^best threshold: ' "$1" | tail -n 1 | awk '{print $3}'; }

# shellcheck disable=SC2086
{
if [ "$DATASET" = toy ]; then
  step toy "$PY" make_toy.py --out "$DATA" ${TOY_ARGS:-}
fi
INIT_FLAG=(); [ -n "$INIT" ] && INIT_FLAG=(--init "$INIT")
SEG_INIT_FLAG=(); [ -n "$SEG_INIT" ] && SEG_INIT_FLAG=(--init "$SEG_INIT")

step match "${TRAIN[@]}" train_match.py "${COMMON[@]}" --clip "$CLIP" --out "$OUT/match" "${INIT_FLAG[@]}" ${MATCH_ARGS:-}
# Baselines, scored on the train list: the CAM network matching starts from (init.pt), and stage (a) alone.
step pseudo_init "$PY" make_pseudo.py "${COMMON[@]}" --checkpoint "$OUT/match/init.pt" --split train \
  --out "$OUT/pseudo_init" ${PSEUDO_ARGS:-}
step pseudo_a "$PY" make_pseudo.py "${COMMON[@]}" --checkpoint "$OUT/match/checkpoint.pt" --split train \
  --out "$OUT/pseudo_a" ${PSEUDO_ARGS:-}
evaluate() {  # evaluate DIR: seeds (threshold sweep over the saved CAMs) and pseudo masks on the train list
  "$PY" eval_miou.py "${COMMON[@]}" --split train --cams "$1/cams" --t_start 0.10 --t_end 0.90 > "$1/seed_eval.txt"
  "$PY" eval_miou.py "${COMMON[@]}" --split train --pred "$1/masks" > "$1/mask_eval.txt"
}
evaluate "$OUT/pseudo_init"
evaluate "$OUT/pseudo_a"
step prompt "${TRAIN[@]}" train_prompt.py "${COMMON[@]}" --clip "$CLIP" --match "$OUT/match/checkpoint.pt" \
  --out "$OUT/prompt" ${PROMPT_ARGS:-}
step refine "${TRAIN[@]}" train_refine.py "${COMMON[@]}" --clip "$CLIP" --init "$OUT/match/init.pt" \
  --prompts "$OUT/prompt/prompts.pt" --out "$OUT/refine" ${REFINE_ARGS:-}
step pseudo "$PY" make_pseudo.py "${COMMON[@]}" --checkpoint "$OUT/refine/checkpoint.pt" --split train_aug \
  --out "$OUT/pseudo" ${PSEUDO_ARGS:-}
evaluate "$OUT/pseudo"
step seg "${TRAIN[@]}" train_seg.py "${COMMON[@]}" --masks "$OUT/pseudo/masks" --out "$OUT/seg" \
  "${SEG_INIT_FLAG[@]}" ${SEG_ARGS:-}
"$PY" eval_miou.py "${COMMON[@]}" --split val --pred "$OUT/seg/pred" > "$OUT/seg/val_eval.txt"
}

printf '\nSemPLeS on %s (mIoU %%; seeds: best background threshold of the sweep, as papers report them)\n' "$DATASET"
printf '%-34s %16s %18s\n' "" "seed (CAM), train" "pseudo mask, train"
printf '%-34s %10s t=%-4s %18s\n' "CAM network before matching" "$(miou "$OUT/pseudo_init/seed_eval.txt")" \
  "$(best_t "$OUT/pseudo_init/seed_eval.txt")" "$(miou "$OUT/pseudo_init/mask_eval.txt")"
printf '%-34s %10s t=%-4s %18s\n' "stage (a) only: L_match" "$(miou "$OUT/pseudo_a/seed_eval.txt")" \
  "$(best_t "$OUT/pseudo_a/seed_eval.txt")" "$(miou "$OUT/pseudo_a/mask_eval.txt")"
printf '%-34s %10s t=%-4s %18s\n' "SemPLeS (a)+(b)+(c)" "$(miou "$OUT/pseudo/seed_eval.txt")" \
  "$(best_t "$OUT/pseudo/seed_eval.txt")" "$(miou "$OUT/pseudo/mask_eval.txt")"
printf '%-34s %35s\n' "segmenter on pseudo masks, val" "$(miou "$OUT/seg/val_eval.txt")"
