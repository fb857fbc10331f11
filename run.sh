#!/usr/bin/env bash
# SemPLeS end to end: CAM network -> (a) -> (b) -> (c) -> CAMs -> pseudo masks -> segmenter -> mIoU table.
#
#   bash run.sh                        # the toy world on CPU (generates data/toy + tiny CLIP if absent)
#   bash run.sh --toy DIR --clip FILE  # any small VOC-layout folder with class_names.txt, any CLIP file
#   bash run.sh --voc data/VOCdevkit/VOC2012 --clip ViT-B/32 \
#       --init data/resnet50-imagenet.pth --seg_init data/resnet101-imagenet.pth --gpus 4
#   bash run.sh --coco data/coco --clip ViT-B/32 --init ... --seg_init ... --gpus 8
#   bash run.sh --seed 1 --out out/toy_seed1   # another pipeline seed
#   bash run.sh --clusters data/toy/clusters.json --out out/toy_clusters   # CAM network with category clusters
#   bash run.sh --no-seg               # stop after the seeds and pseudo masks of the train list (no segmenter)
#
# Stops at the first failure. A finished step leaves OUT/.done/STEP holding the command that made it, a key
# of its inputs (the dataset's files, the CLIP and --init files) and one of its code (the scripts it runs and
# the shared modules); it is skipped on the next run only if all three are the same (else it is redone from
# scratch, and so is every step after it). An interrupted training step resumes from its own checkpoint.
# Extra flags for one stage: CAM_ARGS, MATCH_ARGS, PROMPT_ARGS, REFINE_ARGS, PSEUDO_ARGS, SEG_ARGS, TOY_ARGS.
# Writes OUT/results.json (every number of the printed table) and prints the table; then OUT/report.html (tools/report.py:
# results, loss curves, CAMs per stage, the learned prompts' region maps and nearest words) and prints its path.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATASET=toy DATA="" CLIP="" INIT="" SEG_INIT="" GPUS=1 OUT="" DEVICE="" SEED=504 CLUSTERS="" SEG=1
while [ $# -gt 0 ]; do
  case "$1" in
    --voc|--coco|--toy|--clip|--init|--seg_init|--gpus|--out|--device|--seed|--clusters)
      [ $# -ge 2 ] || { echo "run.sh: $1 needs a value (see bash run.sh --help)" >&2; exit 2; } ;;
  esac
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
    --seed) SEED=$2; shift 2 ;;
    --clusters) CLUSTERS=$2; shift 2 ;;
    --no-seg) SEG=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see bash run.sh --help)" >&2; exit 2 ;;
  esac
done
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --gpus must be a positive integer, got '$GPUS'" >&2; exit 2; }
[[ "$SEED" =~ ^[0-9]+$ ]] || { echo "run.sh: --seed must be a non-negative integer, got '$SEED'" >&2; exit 2; }
[ -n "$DATA" ] || DATA=data/$DATASET
[ -n "$OUT" ] || OUT=out/$DATASET
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
if [ "$DATASET" = toy ] && [ -z "${MAKE_TOY:-}" ]; then
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
[ -n "$DEVICE" ] || DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

COMMON=(--dataset "$DATASET" --data "$DATA" --device "$DEVICE" --seed "$SEED")
TRAIN=("$PY")
[ "$GPUS" -gt 1 ] && TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
mkdir -p "$OUT/.done"
REDO=0

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
step() {  # step NAME DIR command...: run unless done with the same command, inputs and code; a redone step redoes the rest
  local name=$1 dir=$2; shift 2
  local want="$*${INPUTS:+ [inputs $INPUTS]} [code $(code_key "$@")]"
  if [ "$REDO" = 0 ] && [ -f "$OUT/.done/$name" ] && [ "$(head -n 1 "$OUT/.done/$name")" = "$want" ]; then
    echo "== $name: done, skipped"; return
  fi
  if [ -f "$OUT/.done/$name" ]; then  # made by another command, or from an input that was redone
    echo "== $name: its command, its inputs or an earlier step changed, redoing it from scratch"
    rm -f "$OUT/.done/$name"
    [ -z "$dir" ] || rm -rf "$dir"
  fi
  REDO=1
  echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  printf '%s\n%s\n' "$want" "$((SECONDS - t0))" > "$OUT/.done/$name.tmp" && mv "$OUT/.done/$name.tmp" "$OUT/.done/$name"
}
seeds() {  # seeds NAME CHECKPOINT: CAMs of the train list, threshold sweep (seed mIoU), pseudo masks, mIoU
  local name=$1 ckpt=$2
  "$PY" make_pseudo.py "${COMMON[@]}" --checkpoint "$ckpt" --split train --out "$OUT/$name" ${PSEUDO_ARGS:-}
  "$PY" eval_miou.py --dataset "$DATASET" --data "$DATA" --split train --cams "$OUT/$name/cams" \
    --t_start 0.05 --t_end 0.95 --json "$OUT/$name/seed.json" > "$OUT/$name/seed_eval.txt"
  "$PY" eval_miou.py --dataset "$DATASET" --data "$DATA" --split train --pred "$OUT/$name/masks" \
    --json "$OUT/$name/mask.json" > "$OUT/$name/mask_eval.txt"
}

# shellcheck disable=SC2086
{
TOY_JOB=""
if [ -n "${MAKE_TOY:-}" ]; then  # every time: make_toy reuses a world made with its current settings (seconds)
  echo "== toy: $PY tools/make_toy.py --out $DATA ${TOY_ARGS:-}"  # and remakes one made by an older make_toy
  "$PY" tools/make_toy.py --out "$DATA" --part dataset ${TOY_ARGS:-}
  # The tiny CLIP trains on one thread (minutes) while the CAM network, which needs no CLIP, trains too: the
  # same files; on 2 cores the two slow each other down (beside_clip, below, eases it). Its output is shown once done.
  "$PY" tools/make_toy.py --out "$DATA" --part clip ${TOY_ARGS:-} > "$OUT/make_toy.log" 2>&1 &
  TOY_JOB=$!
  trap '[ -z "$TOY_JOB" ] || kill "$TOY_JOB" 2>/dev/null || true' EXIT  # run.sh stopped early: stop it too
fi
inputs() {  # what the steps read besides their command: the dataset's files (but a tiny_clip.pt in it, which
  # may still be training) and the given files (names, sizes, times); part of each step's key, so an edited
  # mask or another CLIP file redoes the steps
  (find "$DATA" -type f ! -name 'tiny_clip.pt*' -printf '%P %s %T@\n' | LC_ALL=C sort
   for f in "$@"; do [ -f "$f" ] && stat -c '%n %s %Y' "$f"; done; true) | sha256sum | cut -c1-16
}
INPUTS=$(inputs "$INIT" "$CLUSTERS")  # the CAM network's
INIT_FLAG=(); [ -n "$INIT" ] && INIT_FLAG=(--init "$INIT")
SEG_INIT_FLAG=(); [ -n "$SEG_INIT" ] && SEG_INIT_FLAG=(--init "$SEG_INIT")
CLUSTER_FLAG=(); [ -n "$CLUSTERS" ] && CLUSTER_FLAG=(--clusters "$CLUSTERS")
CAM=$OUT/cam/checkpoint.pt MATCH=$OUT/match/checkpoint.pt

beside_clip() {  # beside_clip command...: while the tiny CLIP trains in the background, the command's idle OpenMP
  # threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE; the same numbers, bit for bit): both run faster
  # on 2 cores; alone, a stage runs slower with it, so only here (docs/log.md has the timings).
  if [ -n "$TOY_JOB" ]; then OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} "$@"; else "$@"; fi
}
beside_clip step cam "$OUT/cam" "${TRAIN[@]}" train_cam.py "${COMMON[@]}" --out "$OUT/cam" "${SPLIT_FLAG[@]}" \
  "${INIT_FLAG[@]}" "${CLUSTER_FLAG[@]}" ${CAM_ARGS:-}
beside_clip step eval_cam "$OUT/eval_cam" seeds eval_cam "$CAM"
if [ -n "$TOY_JOB" ]; then
  wait "$TOY_JOB" || { cat "$OUT/make_toy.log"; echo "run.sh: tools/make_toy.py --part clip failed (above)" >&2; exit 1; }
  TOY_JOB=""
  cat "$OUT/make_toy.log"
fi
INPUTS=$(inputs "$CLIP" "$INIT" "$SEG_INIT" "$CLUSTERS")  # the later steps' (the CLIP is made by now)
step match "$OUT/match" "${TRAIN[@]}" train_match.py "${COMMON[@]}" --clip "$CLIP" --init "$CAM" --out "$OUT/match" \
  "${SPLIT_FLAG[@]}" ${MATCH_ARGS:-}
step eval_match "$OUT/eval_match" seeds eval_match "$MATCH"
step prompt "$OUT/prompt" "${TRAIN[@]}" train_prompt.py "${COMMON[@]}" --clip "$CLIP" --match "$MATCH" \
  --out "$OUT/prompt" "${SPLIT_FLAG[@]}" ${PROMPT_ARGS:-}
step refine "$OUT/refine" "${TRAIN[@]}" train_refine.py "${COMMON[@]}" --clip "$CLIP" --init "$MATCH" \
  --prompts "$OUT/prompt/prompts.pt" --out "$OUT/refine" "${SPLIT_FLAG[@]}" ${MATCH_ARGS:-} ${REFINE_ARGS:-}
step eval_refine "$OUT/eval_refine" seeds eval_refine "$OUT/refine/checkpoint.pt"
if [ "$SEG" = 1 ]; then
step pseudo "$OUT/pseudo" "$PY" make_pseudo.py "${COMMON[@]}" --checkpoint "$OUT/refine/checkpoint.pt" \
  --split "$TRAIN_LIST" --out "$OUT/pseudo" ${PSEUDO_ARGS:-}
step seg "$OUT/seg" "${TRAIN[@]}" train_seg.py "${COMMON[@]}" --masks "$OUT/pseudo/masks" --out "$OUT/seg" \
  "${SPLIT_FLAG[@]}" "${SEG_INIT_FLAG[@]}" ${SEG_ARGS:-}
step seg_eval "" "$PY" eval_miou.py --dataset "$DATASET" --data "$DATA" --split val --pred "$OUT/seg/pred" \
  --json "$OUT/seg/val.json"
fi
}

"$PY" - "$OUT" "$DATASET" "$SEED" "$SEG" "$CLUSTERS" <<'EOF'
import json, os, sys
out, dataset, seed, seg, clusters = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
def read(path):
    with open(os.path.join(out, path)) as f:
        return json.load(f)
rows = {"cam": "CAM network", "a": "stage (a) only: L_match", "c": "SemPLeS (a)+(b)+(c)"}
folder = {"cam": "eval_cam", "a": "eval_match", "c": "eval_refine"}
res = {"dataset": dataset, "seed": seed, "clusters": clusters or None}
for key in rows:
    s, m = read(f"{folder[key]}/seed.json"), read(f"{folder[key]}/mask.json")
    res[key] = {"seed_miou": round(s["miou"], 2), "seed_threshold": s["best_threshold"],
                "pseudo_miou": round(m["miou"], 2)}
res["segmenter_val_miou"] = round(read("seg/val.json")["miou"], 2) if seg else None  # None: --no-seg
tmp = os.path.join(out, "results.json.tmp")
with open(tmp, "w") as f:
    json.dump(res, f, indent=1)
os.replace(tmp, os.path.join(out, "results.json"))
print(f"\nSemPLeS on {dataset}, seed {seed}{', CAM network with clusters' if clusters else ''} (mIoU %; seeds at the best background threshold of a sweep, "
      "as papers report them; pseudo masks at the fixed preset threshold)")
print(f"{'':34s} {'seed (CAM), train':>17s} {'pseudo mask, train':>19s}")
for key, name in rows.items():
    r = res[key]
    print(f"{name:34s} {r['seed_miou']:10.2f} t={r['seed_threshold']:<4.2f} {r['pseudo_miou']:19.2f}")
seg_cell = f"{res['segmenter_val_miou']:37.2f}" if seg else f"{'not run (--no-seg)':>37s}"
print(f"{'segmenter on pseudo masks, val':34s} {seg_cell}")
print(f"results: {os.path.join(out, 'results.json')}")
EOF

# The pictures and numbers of this run on one page (tools/report.py): read from OUT, redone when any step was.
step report "$OUT/report" "$PY" tools/report.py --dataset "$DATASET" --data "$DATA" --out "$OUT" --clip "$CLIP" --device "$DEVICE"
echo "report: $OUT/report.html"
