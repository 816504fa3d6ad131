#!/bin/bash
# The whole NBDiff recipe for your model and data, as dependent SLURM jobs:
#   convert (HF -> megatron-core) -> phase 1 (8K) -> phase 2 (32K) -> phase 3 (SFT) -> export (-> HF)
#
#   slurm/pipeline.sh --hf DIR --root DIR --data PREFIXES --sft-data FILES [options] [--dry-run]
#
# Every phase trains the converted model's shape (--model-config DIR_of_root/base-mcore/model.yaml: the
# phase configs keep their sequence length and RoPE settings) on your data with your tokenizer. Each
# phase starts from the previous phase's final checkpoint (--checkpoint.load=<previous save>, weights
# only, as the phase configs say) and only once that phase really completed: a phase job that was
# preempted requeues itself (same job id) instead of ending COMPLETED, `afterok` waits for it, and the
# next phase also checks the previous save directory's COMPLETE marker before it starts (NBDIFF_AFTER,
# see slurm/nbdiff.sbatch). Re-running the pipeline after a failure is safe: converted or exported
# folders that exist are kept, and a phase that is already complete exits at once.
#
# Every path is checked before anything is submitted (all problems at once); --dry-run checks them
# too and prints the exact sbatch commands instead of submitting them.
#
# Options:
#   --hf DIR           the HF base model to convert (required)
#   --root DIR         where the checkpoints go: DIR/base-mcore, DIR/phase1, DIR/phase2, DIR/phase3_sft
#                      (required)
#   --data PREFIXES    pre-training data of phases 1 and 2: indexed-dataset prefixes written by
#                      `nbdiff preprocess`, Megatron blend syntax allowed ("0.7 a 0.3 b") (required)
#   --phase2-data P    phase 2's own data (long documents), instead of --data
#   --sft-data FILES   phase 3's chat JSONL files, space-separated (required)
#   --tokenizer PATH   tokenizer file or folder (default: the converted checkpoint's tokenizer/)
#   --phase1 "ARGS"    config overrides for phase 1 only, e.g. "--train.steps=1000 --parallel.dp=8"
#   --phase2 "ARGS"    ... phase 2 only;  --phase3 "ARGS": phase 3 only
#   --all "ARGS"       config overrides for every phase (after the pipeline's own, before --phaseN)
#   --out DIR          the exported HF model (default: DIR_of_root/nbdiff-hf)
#   --tp N             tensor-parallel size of the conversion (default: phase 1's parallel.tp)
#   --sbatch-args S    extra sbatch options for every job (e.g. "--account=proj --partition=gpu")
#   --dry-run          check the paths and print the sbatch commands instead of submitting them
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
HF="" ROOT="" OUT="" TP="" DRY=0 EXTRA="" DATA="" DATA2="" SFT="" TOK=""
PHASE1="" PHASE2="" PHASE3="" ALL=""
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || case $1 in --dry-run|-h|--help) ;; *) echo "pipeline.sh: $1 needs a value" >&2; exit 2 ;; esac
  case $1 in
    --hf) HF=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --tp) TP=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --phase2-data) DATA2=$2; shift 2 ;;
    --sft-data) SFT=$2; shift 2 ;;
    --tokenizer) TOK=$2; shift 2 ;;
    --phase1) PHASE1=$2; shift 2 ;;
    --phase2) PHASE2=$2; shift 2 ;;
    --phase3) PHASE3=$2; shift 2 ;;
    --all) ALL=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --sbatch-args) EXTRA=$2; shift 2 ;;
    -h|--help) sed -n '2,35p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "pipeline.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
missing_opts=()
for pair in "--hf:$HF" "--root:$ROOT" "--data:$DATA" "--sft-data:$SFT"; do
  [ -n "${pair#*:}" ] || missing_opts+=("${pair%%:*}")
done
if [ ${#missing_opts[@]} -gt 0 ]; then
  echo "pipeline.sh: ${missing_opts[*]} required (see --help)" >&2
  exit 2
fi

abs() { realpath -m -- "$1"; }
# Blend syntax "0.7 a 0.3 b" or "a b": every prefix made absolute, weights kept.
abs_blend() {
  local word out=()
  for word in $1; do
    if [[ $word =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then out+=("$word"); else out+=("$(abs "$word")"); fi
  done
  echo "${out[*]}"
}
HF=$(abs "$HF")
ROOT=$(abs "$ROOT")
OUT=$(abs "${OUT:-$(dirname "$ROOT")/nbdiff-hf}")
BASE=$ROOT/base-mcore
DATA=$(abs_blend "$DATA")
DATA2=$(abs_blend "${DATA2:-$DATA}")
sft_files=()
for f in $SFT; do sft_files+=("$(abs "$f")"); done
TOK=$(abs "${TOK:-$BASE/tokenizer}")
if [ -z "$TP" ]; then
  TP=$(awk '/^parallel:/ {p = 1; next} /^[^ #]/ {p = 0} p && $1 == "tp:" {print $2; exit}' "$REPO/examples/phase1_8k.yaml")
fi

# --- every path the jobs will read, checked now (all problems at once)
problems=()
need() {  # need TEST PATH WHAT
  test "$1" "$2" || problems+=("$3: $2")
}
need -f "$HF/config.json" "--hf: no HF model (config.json)"
[ -d "$BASE" ] && need -f "$BASE/model.yaml" "--root: a converted checkpoint without model.yaml"
check_prefixes() {  # check_prefixes OPTION BLEND
  local word
  for word in $2; do
    [[ $word == /* ]] || continue  # a weight
    need -f "$word.bin" "$1: no indexed dataset (.bin)"
    need -f "$word.idx" "$1: no indexed dataset (.idx)"
  done
}
check_prefixes --data "$DATA"
[ "$DATA2" = "$DATA" ] || check_prefixes --phase2-data "$DATA2"
for f in "${sft_files[@]}"; do need -f "$f" "--sft-data: no such file"; done
if [ "$TOK" = "$BASE/tokenizer" ] && [ ! -e "$TOK" ]; then
  # The converter copies the HF model's tokenizer there: it must have one.
  [ -f "$HF/tokenizer.json" ] || [ -f "$HF/tokenizer.model" ] ||
    problems+=("--hf: no tokenizer (tokenizer.json / tokenizer.model) to convert; pass --tokenizer: $HF")
else
  need -e "$TOK" "--tokenizer: no such file or folder"
fi
for phase in phase1_8k phase2_32k phase3_sft; do
  need -f "$HERE/$phase.sbatch" "missing launcher"
  need -f "$REPO/examples/$phase.yaml" "missing config"
done
root_parent=$ROOT
while [ ! -e "$root_parent" ]; do root_parent=$(dirname "$root_parent"); done
need -w "$root_parent" "--root: not writable"
if [ ${#problems[@]} -gt 0 ]; then
  echo "pipeline.sh: nothing submitted; fix these paths:" >&2
  printf '  %s\n' "${problems[@]}" >&2
  exit 2
fi

# The one-node CPU jobs (convert, export) run the nbdiff CLI in the same environment as the phases.
ENV_LINE='if [ -n "${NBDIFF_ENV:-}" ]; then if [ -d "$NBDIFF_ENV" ]; then source "$NBDIFF_ENV/bin/activate"; else source "$NBDIFF_ENV"; fi; elif [ -f '"$REPO"'/.venv/bin/activate ]; then source '"$REPO"'/.venv/bin/activate; fi'

n=0
submit() {  # submit NAME DEPENDENCY sbatch-args...; sets JOB
  local name=$1 dep=$2
  shift 2
  local cmd=(sbatch --parsable --job-name="nbdiff-$name" --open-mode=append --output="%x-%j.out")
  # shellcheck disable=SC2206
  [ -n "$EXTRA" ] && cmd+=($EXTRA)
  [ -n "$dep" ] && cmd+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
  cmd+=("$@")
  n=$((n + 1))
  if [ "$DRY" = 1 ]; then
    local arg line=""
    for arg in "${cmd[@]}"; do
      case $arg in
        *[[:space:]\;\"\$\|\<\>\[\]\*]*) line+="'${arg//\'/\'\\\'\'}' " ;;
        *) line+="$arg " ;;
      esac
    done
    echo "${line% }"
    JOB="<job$n:$name>"
  else
    JOB=$("${cmd[@]}")
    JOB=${JOB%%;*}
    echo "submitted $name: job $JOB${dep:+ (after $dep)}" >&2
  fi
}

# phase_args PHASE_DIR DATA_OVERRIDE EXTRA: the overrides every phase gets, then --all, then its own.
phase_args() {
  local save=$ROOT/$1
  ARGS=(--model-config="$BASE/model.yaml" "$2" --data.tokenizer_model="$TOK"
    --checkpoint.finetune=true --checkpoint.save="$save" --logging.tensorboard_dir="$save/tensorboard")
  # shellcheck disable=SC2206
  ARGS+=($ALL $3)
}

submit convert "" --nodes=1 --ntasks=1 --cpus-per-task=16 --time=4:00:00 --wrap \
  "$ENV_LINE; cd $REPO; [ -d $BASE ] || python -m nbdiff_megatron.cli convert hf-to-mcore --hf $HF --out $BASE --tp $TP --no-progress"
convert=$JOB
phase_args phase1 "--data.data_path=[$DATA]" "$PHASE1"
submit phase1 "$convert" "$HERE/phase1_8k.sbatch" --checkpoint.load="$BASE" "${ARGS[@]}"
phase1=$JOB
phase_args phase2 "--data.data_path=[$DATA2]" "$PHASE2"
submit phase2 "$phase1" --export=ALL,NBDIFF_AFTER="$ROOT/phase1" "$HERE/phase2_32k.sbatch" \
  --checkpoint.load="$ROOT/phase1" "${ARGS[@]}"
phase2=$JOB
sft_list=$(IFS=,; echo "${sft_files[*]}")
phase_args phase3_sft "--data.sft_data_path=[$sft_list]" "$PHASE3"
submit phase3 "$phase2" --export=ALL,NBDIFF_AFTER="$ROOT/phase2" "$HERE/phase3_sft.sbatch" \
  --checkpoint.load="$ROOT/phase2" "${ARGS[@]}"
phase3=$JOB
submit export "$phase3" --nodes=1 --ntasks=1 --cpus-per-task=16 --time=4:00:00 --wrap \
  "$ENV_LINE; cd $REPO; test -f $ROOT/phase3_sft/COMPLETE; [ -d $OUT ] || python -m nbdiff_megatron.cli convert mcore-to-hf --mcore $ROOT/phase3_sft --out $OUT --no-progress"
if [ "$DRY" = 0 ]; then
  echo "pipeline: convert $convert -> phase1 $phase1 -> phase2 $phase2 -> phase3 $phase3 -> export $JOB"
fi
