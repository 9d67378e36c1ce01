#!/usr/bin/env bash
# Medusa heads for SmolLM2-135M-Instruct (the embedded default model), Medusa-2 style:
#   1. self-distillation: the model answers the 1,000 Alpaca instructions in data/train/ with its own
#      chat template (greedy, up to 256 new tokens, batches of 16 with left padding), cached as a
#      `datasets` dataset under runs/self_distill/ (one shard per batch; an interrupted run resumes
#      and skips the prompts already answered);
#   2. training: 4 heads x 1 residual layer, shared (frozen) LM head, λ = 0.8, bf16 autocast,
#      3 epochs over 950 answers (the last 5% = 50 answers are held out for top-1/top-5 accuracy),
#      checkpoints every 50 steps (re-running this script resumes from runs/smollm2-heads/);
#   3. output: medusa_engine/assets/heads/smollm2-135m-instruct/{config.json,heads.safetensors,
#      metrics.json}; `medusa-engine generate` (default model) then picks the heads up by itself.
#
# Never train on MT-Bench or Spec-Bench prompts (they are the evaluation sets).
#
# Usage:   scripts/train_heads_smollm2.sh [extra train-heads flags]
#          SMOKE=1 scripts/train_heads_smollm2.sh       # 8 prompts, 3 steps, into runs/ (pipeline check)
#          LAUNCH="accelerate launch -m" scripts/train_heads_smollm2.sh   # on GPUs (DDP)
# Sizing, measured 2026-11-26 on 2 CPU cores shared with other jobs (bf16 weights + bf16 autocast,
# torch 2.13 CPU), 16 Alpaca prompts, the settings below:
#   self-distillation: 16 prompts in one batch of 16, 2,769 answer tokens (mean 173, 9 of 16 hit the
#     256 cap) in 125.8 s = 22.0 answer tok/s  ->  1,000 prompts ~ 2.2 h on such a CPU;
#   training: 8.8 s per step (batch 8, sequences of 45-471 tokens, mean ~230), 3 epochs = 354 steps
#     ~ 52 min; held-out evaluation ~1 min.
# On a GPU both are minutes. Run SMOKE=1 first on the target machine (20 s here) to check the setup.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
LAUNCH=${LAUNCH:-"$PY -m"}
DATA=data/train/alpaca_data_cleaned_1000.json

if [[ "${SMOKE:-0}" == "1" ]]; then
  OUT=runs/smollm2-smoke/heads
  RUN=(--max-examples 8 --distill-max-new-tokens 32 --distill-batch-size 4
       --distill-cache runs/smollm2-smoke/self_distill --checkpoint runs/smollm2-smoke/train_state.pt
       --eval-fraction 0.25 --batch-size 2 --steps 3 --max-length 256)
else
  OUT=medusa_engine/assets/heads/smollm2-135m-instruct
  RUN=(--distill-max-new-tokens 256 --distill-batch-size 16
       --distill-cache runs/self_distill/smollm2-135m-instruct-alpaca1000
       --checkpoint runs/smollm2-heads/train_state.pt --checkpoint-every 50
       --batch-size 8 --epochs 3 --max-length 512)
fi

# shellcheck disable=SC2086
$LAUNCH medusa_engine.train_heads \
  --model smollm2-135m-instruct --dtype bf16 --precision bf16 \
  --data "$DATA" --self-distill --distill-temperature 0 \
  --out "$OUT" --resume \
  --num-heads 4 --num-layers 1 --decay 0.8 --lr 2e-3 --warmup-steps 20 --seed 0 \
  "${RUN[@]}" "$@"
