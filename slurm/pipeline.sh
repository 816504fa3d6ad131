#!/bin/bash
# The whole NBDiff-7B recipe as dependent SLURM jobs:
#   convert (HF -> megatron-core) -> phase 1 (8K) -> phase 2 (32K) -> phase 3 (SFT) -> export (-> HF)
#
#   slurm/pipeline.sh --hf /models/openPangu-7B --root /checkpoints/nbdiff7b [--out DIR] [--dry-run]
#
# Each phase starts from the previous phase's final checkpoint (--checkpoint.load=<previous save>,
# weights only, as the phase configs say) and only once that phase really completed: a phase job that
# was preempted requeues itself (same job id) instead of ending COMPLETED, `afterok` waits for it, and
# the next phase also checks the previous save directory's COMPLETE marker before it starts
# (NBDIFF_AFTER, see slurm/nbdiff.sbatch). Re-running the pipeline after a failure is safe: converted or
# exported folders that exist are kept, and a phase that is already complete exits at once.
#
# Options:
#   --hf DIR         the HF base model to convert (required)
#   --root DIR       where the checkpoints go: DIR/base-mcore, DIR/phase1, DIR/phase2, DIR/phase3_sft
#   --out DIR        the exported HF model (default: DIR_of_root/nbdiff-7b-hf)
#   --tp N           tensor-parallel size of the phase configs, for the conversion (default 2)
#   --dry-run        print the sbatch commands instead of submitting them
#   --sbatch-args S  extra sbatch options for every job (e.g. "--account=proj --partition=gpu")
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
HF="" ROOT="" OUT="" TP=2 DRY=0 EXTRA=""
while [ $# -gt 0 ]; do
  case $1 in
    --hf) HF=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --tp) TP=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --sbatch-args) EXTRA=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "pipeline.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$HF" ] || [ -z "$ROOT" ]; then
  echo "pipeline.sh: --hf and --root are required (see --help)" >&2
  exit 2
fi
OUT=${OUT:-$ROOT/nbdiff-7b-hf}
BASE=$ROOT/base-mcore

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
        *[[:space:]\;\"\$\|\<\>]*) line+="'${arg//\'/\'\\\'\'}' " ;;
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

submit convert "" --nodes=1 --ntasks=1 --cpus-per-task=16 --time=4:00:00 --wrap \
  "$ENV_LINE; cd $REPO; [ -d $BASE ] || python -m nbdiff_megatron.cli convert hf-to-mcore --hf $HF --out $BASE --tp $TP --no-progress"
convert=$JOB
submit phase1 "$convert" "$HERE/phase1_8k.sbatch" \
  --checkpoint.load="$BASE" --checkpoint.finetune=true --checkpoint.save="$ROOT/phase1" \
  --logging.tensorboard_dir="$ROOT/phase1/tensorboard"
phase1=$JOB
submit phase2 "$phase1" --export=ALL,NBDIFF_AFTER="$ROOT/phase1" "$HERE/phase2_32k.sbatch" \
  --checkpoint.load="$ROOT/phase1" --checkpoint.finetune=true --checkpoint.save="$ROOT/phase2" \
  --logging.tensorboard_dir="$ROOT/phase2/tensorboard"
phase2=$JOB
submit phase3 "$phase2" --export=ALL,NBDIFF_AFTER="$ROOT/phase2" "$HERE/phase3_sft.sbatch" \
  --checkpoint.load="$ROOT/phase2" --checkpoint.finetune=true --checkpoint.save="$ROOT/phase3_sft" \
  --logging.tensorboard_dir="$ROOT/phase3_sft/tensorboard"
phase3=$JOB
submit export "$phase3" --nodes=1 --ntasks=1 --cpus-per-task=16 --time=4:00:00 --wrap \
  "$ENV_LINE; cd $REPO; test -f $ROOT/phase3_sft/COMPLETE; [ -d $OUT ] || python -m nbdiff_megatron.cli convert mcore-to-hf --mcore $ROOT/phase3_sft --out $OUT --no-progress"
if [ "$DRY" = 0 ]; then
  echo "pipeline: convert $convert -> phase1 $phase1 -> phase2 $phase2 -> phase3 $phase3 -> export $JOB"
fi
