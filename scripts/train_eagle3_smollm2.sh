#!/usr/bin/env bash
# EAGLE-3 drafter for SmolLM2-135M-Instruct (issue 18), on the data of the recurrent heads
# (scripts/train_heads_smollm2.sh): the model's greedy and two sampled (t 0.7) answers to the
# 1,000 Alpaca instructions (committed in data/train/self_distill/) plus the Alpaca reference
# answers; the last 5% of the greedy answers (50 prompts) held out, their other answers left out.
#   1. features: the frozen model (bf16) runs once over every example; the outputs of its aux
#      layers (2, 15, 27) and its next-token choices are cached in
#      runs/smollm2-eagle3/eagle3_features.safetensors (bf16, ~3.5 kB per token);
#   2. training: kind eagle3 (medusa_engine/eagle3.py), training-time test unrolled 4 steps,
#      λ = 0.8, 16,384-token draft vocabulary, bf16 autocast over fp32 master weights (AMX on
#      this CPU: ~3x the fp32 matmul rate), checkpoints every 100 steps and on Ctrl-C / SIGTERM
#      (re-running resumes when the checkpoint is there);
#   3. held-out per-depth accuracy and confidence temperatures -> metrics.json, config.json.
# Never train on MT-Bench or Spec-Bench prompts (they are the evaluation sets).
#
# Usage:   scripts/train_eagle3_smollm2.sh [extra train-heads flags]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
LAUNCH=${LAUNCH:-"$PY -m"}
OUT=${OUT:-medusa_engine/assets/heads/smollm2-135m-instruct-eagle3}
CHECKPOINT=${CHECKPOINT:-runs/smollm2-eagle3/train_state.safetensors}
RESUME=()
if [[ -f "$CHECKPOINT" ]]; then RESUME=(--resume); fi

# shellcheck disable=SC2086
$LAUNCH medusa_engine.training.cli \
  --model smollm2-135m-instruct --dtype bf16 \
  --data data/train/alpaca_data_cleaned_1000.json --self-distill --distill-temperature 0 \
  --extra-distill-temperature 0.7 --extra-distill-temperature 0.7 --with-reference-answers \
  --distill-max-new-tokens 256 --distill-batch-size 32 \
  --distill-cache data/train/self_distill/smollm2-135m-instruct-alpaca_data_cleaned_1000 \
  --out "$OUT" --overwrite --checkpoint "$CHECKPOINT" ${RESUME[@]+"${RESUME[@]}"} \
  --kind eagle3 --num-heads 4 --draft-vocab 16384 --decay 0.8 \
  --lr ${LR:-1e-3} --warmup-steps 50 --precision bf16 --seed 0 --save-dtype bf16 \
  --batch-size 8 --epochs ${EPOCHS:-3} --max-length 512 --checkpoint-every 100 \
  "$@"
