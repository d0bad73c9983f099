#!/usr/bin/env bash
# The paper's ablations at one equal budget: each variant is trained from scratch by the same
# recipe (benchmarks/configs/ablations/*.json: identical but for the one switch), then answers the
# same seeded SQuAD-dev questions, and is compared with SAC question by question.
#
#   bash benchmarks/ablations.sh [VARIANT ...]   # default: all four; resumes runs and evals
#   N=500 bash benchmarks/ablations.sh sac no-mask & N=500 bash benchmarks/ablations.sh \
#       no-anchor-embedding compression-tokens     # two at a time on a 2-core machine
#   bash benchmarks/ablations.sh sac-seed4 no-mask-seed4   # the same pair with another seed
#   bash benchmarks/ablations.sh lm-then-qa   # the SAC recipe after 60 LM-pretraining steps
#
# Rows go to benchmarks/results/issue3_ablations.jsonl; the paired table is printed at the end
# once all four have answered.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N=${N:-500}
THREADS=${THREADS:-1}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$THREADS
ALL=(sac no-mask no-anchor-embedding compression-tokens)
VARIANTS=("${@:-${ALL[@]}}")

for variant in "${VARIANTS[@]}"; do
  config=benchmarks/configs/ablations/$variant.json
  run=runs/ablation-$variant
  if [ "$variant" = lm-then-qa ] && [ ! -d runs/ablation-lm-pretrain/final ]; then  # its LM stage comes first
    "$PY" -m sac_rag.train --config benchmarks/configs/ablations/lm-pretrain.json --resume
  fi
  [ -d "$run/final" ] || "$PY" -m sac_rag.train --config "$config" --resume  # starts fresh if nothing to resume
  "$PY" -m sac_rag.eval --dataset squad-dev --n "$N" --seed 0 --threads "$THREADS" --method sac \
    --checkpoint "$run/final" --label "ablation-$variant" --results benchmarks/results/issue3_ablations.jsonl
done

# Each variant's predictions by its compressor's fingerprint (a retrained variant's old file is
# another file); without its run, the one file of that variant there is.
weights() { "$PY" -c "import sys; from sac_rag.compressor import checkpoint_meta
print(checkpoint_meta(sys.argv[1])['fingerprint'].partition('/sac-')[2][:8])" "$1"; }
files=()
for variant in "${ALL[@]}"; do
  if [ -d "runs/ablation-$variant/final" ]; then
    files+=(benchmarks/results/predictions/ablation-"$variant"-"$(weights "runs/ablation-$variant/final")"-squad-dev-n"$N"-s0.jsonl)
  else  # ???????? is the fingerprint (so "sac" does not also match "sac-seed4")
    found=(benchmarks/results/predictions/ablation-"$variant"-????????-squad-dev-n"$N"-s0.jsonl)
    if [ "${#found[@]}" -ne 1 ]; then
      echo "no paired table: ${#found[@]} prediction files of $variant and no runs/ablation-$variant to tell which" >&2
      exit 0
    fi
    files+=("${found[0]}")
  fi
done
if ls "${files[@]}" >/dev/null 2>&1; then
  "$PY" benchmarks/paired.py --dataset squad-dev --n "$N" "${files[@]}"
fi
