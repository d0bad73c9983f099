#!/usr/bin/env bash
# Every method of the quality/speed/memory comparison, same model, data, prompt and scoring.
#
#   bash benchmarks/quality_suite.sh [N] [SHIFT_N]     # defaults: 200 SQuAD-dev, 200 SQuADShifts
#   python benchmarks/report.py                        # table + plots from the rows
#
# Rows go to benchmarks/results/quality.jsonl; per-question predictions are cached under
# benchmarks/results/predictions, so an interrupted run resumes (rerunning a finished command
# costs only its timing samples and appends a fresh row; the report keeps the last).
# Peer baselines from NVIDIA kvpress need their own environment: benchmarks/kvpress/README.md.
# 34 minutes on an idle 2-core machine at the defaults, cold (no cached predictions), measured
# before the two sac-15x commands were added (each ~3.5 min on one thread).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
SHIFT_N=${2:-200}
PY=${PYTHON:-.venv/bin/python}
SAC=${SAC_CHECKPOINT:-smollm2-135m-sac-5x}
SAC15=${SAC15_CHECKPOINT:-smollm2-135m-sac-15x}
# Rows are labelled sac-5x / sac-15x for the shipped compressors only: another checkpoint's rows are
# labelled by its path (or SAC_LABEL / SAC15_LABEL), never taking the shipped ones' place.
label_of() { if [ "$1" = "$2" ]; then echo "$3"; else local path="${1%/}"; echo "sac-${path//\//-}"; fi; }
SAC_LABEL=${SAC_LABEL:-$(label_of "$SAC" smollm2-135m-sac-5x sac-5x)}
SAC15_LABEL=${SAC15_LABEL:-$(label_of "$SAC15" smollm2-135m-sac-15x sac-15x)}
FULLFT=benchmarks/checkpoints/full-ft-smollm2-135m-squad
export HF_HUB_OFFLINE=1

eval_() { "$PY" -m sac_rag.eval --n "$N" "$@"; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

for dataset in squad-dev squadshifts-new-wiki; do
  [ "$dataset" = squad-dev ] || N=$SHIFT_N
  eval_ --dataset "$dataset" --method no_context --label no-context
  eval_ --dataset "$dataset" --method full_context --label full-context
  eval_ --dataset "$dataset" --method full_ft --checkpoint "$FULLFT" --label full-ft
  for ratio in 5 15; do
    for method in kv_dropping text_every_rth text_truncate; do
      label="${method/kv_dropping/kv-dropping}"; label="${label/text_/text-}-${ratio}x"
      eval_ --dataset "$dataset" --method "$method" --ratio "$ratio" --label "$label"
      eval_ --dataset "$dataset" --method "$method" --ratio "$ratio" --decoder-adapter "$FULLFT" \
            --label "$label+fullft-decoder"
    done
  done
  # The trained compressors (SAC_CHECKPOINT / SAC15_CHECKPOINT to evaluate others).
  eval_ --dataset "$dataset" --method sac --checkpoint "$SAC" --label "$SAC_LABEL"
  eval_ --dataset "$dataset" --method sac --checkpoint "$SAC15" --label "$SAC15_LABEL"
done

# What 8-bit storage of its caches costs.
N=${1:-200}
for storage in fp8 int8; do
  eval_ --method sac --checkpoint "$SAC" --storage "$storage" --label "$SAC_LABEL-$storage"
done
echo "quality suite: ${SECONDS} s wall time (N=$N, SHIFT_N=$SHIFT_N, $(nproc --all) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
