#!/usr/bin/env bash
# Data preparation as a Slurm array job: one array task per input file, each writing its own dataset part;
# then one merge into the dataset that training reads (data.dataset_dir).
#
#   split -n l/64 -d --additional-suffix=.jsonl items.jsonl inputs/items_     # 64 input files
#   INPUT_DIR=inputs OUT_DIR=/data/emu3_unimod MODE=images VQ_MODEL=/models/Emu3-VisionTokenizer \
#     TOKENIZER=/models/Emu3-Gen/tokenizer sbatch --array=0-63%16 slurm/prepare_data_array.sh
#   # when all tasks are done (or submit it with --dependency=afterok:<array job id>):
#   MERGE=1 OUT_DIR=/data/emu3_unimod sbatch slurm/prepare_data_array.sh
#
# Settings (environment variables; relative paths are taken from the submit directory):
#   MODE        images | text: which `python -m data.prepare` sub-command each task runs       [images]
#   INPUT_DIR   directory of input files; task i takes the i-th file in sorted order
#               (images: *.jsonl item manifests; text: *.txt)                                  [required]
#   OUT_DIR     parts go to OUT_DIR/parts/part_<i>; MERGE=1 writes the dataset to OUT_DIR      [required]
#   TOKENIZER   sentencepiece .model or HF tokenizer directory (the same for every task)       [required]
#   VQ_MODEL    Emu3VQVAE directory (MODE=images)                                              [required for images]
#   VISUAL_SIZE codebook size of the image tokenizer (MODE=text with a sentencepiece tokenizer)
#   EXTRA_ARGS  more arguments for data.prepare (e.g. "--shard-size-mb 256"; caption dropout is data.caption_dropout, drawn by the loader)
#   MERGE       1: merge OUT_DIR/parts/part_* into OUT_DIR instead of preparing a part
#   PYTHON      interpreter                        [<repo>/.venv/bin/python if present, else python3]
# A task whose part already has a manifest.json is skipped, so a re-submitted array redoes only what failed.
#
#SBATCH --job-name=emu3-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail

die() { echo "[prepare_data_array.sh] ERROR: $*" >&2; exit 2; }
abspath() { case $1 in /*) echo "$1" ;; *) echo "${SLURM_SUBMIT_DIR:-$PWD}/$1" ;; esac; }

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
[[ -f $REPO_DIR/data/prepare.py ]] || die "REPO_DIR=$REPO_DIR is not this repository (submit from its root or set REPO_DIR)"
cd "$REPO_DIR"
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
[[ -n ${OUT_DIR:-} ]] || die "OUT_DIR is not set"
OUT_DIR=$(abspath "$OUT_DIR")

if [[ ${MERGE:-0} == 1 ]]; then
  shopt -s nullglob
  parts=("$OUT_DIR"/parts/part_*)
  (( ${#parts[@]} > 0 )) || die "no parts under $OUT_DIR/parts"
  for p in "${parts[@]}"; do [[ -f $p/manifest.json ]] || die "$p has no manifest.json (its task failed or is still running)"; done
  exec "$PYTHON" -m data.prepare merge --out "$OUT_DIR" "${parts[@]}"
fi

MODE=${MODE:-images}
[[ $MODE == images || $MODE == text ]] || die "MODE=$MODE: expected images or text"
[[ -n ${INPUT_DIR:-} ]] || die "INPUT_DIR is not set"
INPUT_DIR=$(abspath "$INPUT_DIR")
[[ -n ${TOKENIZER:-} ]] || die "TOKENIZER is not set"
TOKENIZER=$(abspath "$TOKENIZER")
[[ -e $TOKENIZER ]] || die "TOKENIZER=$TOKENIZER does not exist"
[[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || die "not an array task: submit with sbatch --array=0-<N-1> (or set MERGE=1)"
pattern=$([[ $MODE == images ]] && echo '*.jsonl' || echo '*.txt')
mapfile -t inputs < <(find "$INPUT_DIR" -maxdepth 1 -type f -name "$pattern" | sort)
(( ${#inputs[@]} > 0 )) || die "no $pattern files in INPUT_DIR=$INPUT_DIR"
i=$SLURM_ARRAY_TASK_ID
(( i < ${#inputs[@]} )) || die "array task $i but INPUT_DIR has only ${#inputs[@]} $pattern files (use --array=0-$(( ${#inputs[@]} - 1 )))"
part="$OUT_DIR/parts/part_$(printf %05d "$i")"
if [[ -f $part/manifest.json ]]; then
  echo "[prepare_data_array.sh] $part is already complete; nothing to do"
  exit 0
fi
read -r -a extra <<<"${EXTRA_ARGS:-}"
if [[ $MODE == images ]]; then
  [[ -n ${VQ_MODEL:-} ]] || die "VQ_MODEL is not set (MODE=images)"
  VQ_MODEL=$(abspath "$VQ_MODEL")
  cmd=("$PYTHON" -m data.prepare images --manifest "${inputs[$i]}" --vq-model "$VQ_MODEL" --tokenizer "$TOKENIZER")
else
  cmd=("$PYTHON" -m data.prepare text --input "${inputs[$i]}" --tokenizer "$TOKENIZER")
  [[ -n ${VISUAL_SIZE:-} ]] && cmd+=(--visual-size "$VISUAL_SIZE")
fi
echo "[prepare_data_array.sh] task $i: ${inputs[$i]} -> $part"
exec "${cmd[@]}" --out "$part" "${extra[@]}"
