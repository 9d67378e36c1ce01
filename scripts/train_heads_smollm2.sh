#!/usr/bin/env bash
# Medusa heads for SmolLM2-135M-Instruct (the embedded default model), Medusa-2 style:
#   1. self-distillation: the model's own greedy answers to the 1,000 Alpaca instructions in
#      data/train/ (chat template, up to 256 new tokens), plus two answers each sampled at
#      temperature 0.7 (seeds 1 and 2). All are committed in data/train/self_distill/ (135,333 +
#      131,878 + 133,554 answer tokens; 1,214 s + 1,377 s + 3,273 s (low priority) in batches of
#      32 on the 2-core CPU, 2026-11-26), so this script does not regenerate them;
#   2. features: the frozen model runs once over those answers and over the Alpaca reference
#      answers (prompts of held-out examples excluded); last hidden states + its own next-token
#      choices are cached in runs/smollm2-heads/features.safetensors;
#   3. training: recurrent heads (medusa_engine/recurrent_heads.py: one transition MLP, 2048 wide,
#      over the shared frozen embedding and LM head, 16,384-token draft vocabulary), 4 depths,
#      λ = 0.8, feature-regression weight 1, 2 epochs of 256-position batches; the last 5% of
#      the greedy answers (50 prompts) are held out for top-1/top-5 and to fit the per-depth
#      confidence temperatures (their prompts' sampled and reference answers are left out of
#      training);
#      checkpoints every 200 steps, and one on Ctrl-C / SIGTERM (re-running this script resumes
#      from runs/smollm2-heads/ when a checkpoint is there, else starts over);
#   4. output: medusa_engine/assets/heads/smollm2-135m-instruct/{config.json,heads.safetensors,
#      metrics.json}; `medusa-engine chat` / `generate` (default model) then pick the heads up.
#
# Never train on MT-Bench or Spec-Bench prompts (they are the evaluation sets).
#
# Usage:   scripts/train_heads_smollm2.sh [extra train-heads flags]
#          SMOKE=1 scripts/train_heads_smollm2.sh       # 8 prompts, 3 steps, into runs/ (pipeline check)
#          LAUNCH="accelerate launch -m" scripts/train_heads_smollm2.sh   # on GPUs (DDP)
#          OUT=runs/x/heads CHECKPOINT=runs/x/train_state.safetensors scripts/train_heads_smollm2.sh
#                                       # elsewhere (resumes when CHECKPOINT is there)
# History (2026-11-26, 2-core CPU): Medusa heads (1 residual block + linear map, shared LM head),
#   3 epochs on the greedy answers only: held-out top-1 0.297 / 0.156 / 0.105 / 0.101, τ 1.48,
#   1.11x on 8 MT-Bench prompts. Recurrent heads replaced them; see the heads' README.md.
#   The f4665be recurrent heads (greedy + reference answers only, 8,192 draft vocabulary): held-out
#   top-1 0.514 / 0.428 / 0.409 / 0.413. The e9c327d heads (+ one sampled pass, 16,384 vocabulary,
#   3 epochs): 0.552 / 0.447 / 0.429 / 0.420.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
LAUNCH=${LAUNCH:-"$PY -m"}
DATA=data/train/alpaca_data_cleaned_1000.json

if [[ "${SMOKE:-0}" == "1" ]]; then
  OUT=${OUT:-runs/smollm2-smoke/heads}
  CHECKPOINT=${CHECKPOINT:-runs/smollm2-smoke/train_state.safetensors}
  RUN=(--max-examples 8 --distill-max-new-tokens 32 --distill-batch-size 4
       --distill-cache runs/smollm2-smoke/self_distill
       --eval-fraction 0.25 --batch-size 64 --steps 3 --max-length 256 --with-reference-answers)
else
  OUT=${OUT:-medusa_engine/assets/heads/smollm2-135m-instruct}
  CHECKPOINT=${CHECKPOINT:-runs/smollm2-heads/train_state.safetensors}
  # The self-distilled answers are committed (data/train/PROVENANCE.md): nothing to regenerate.
  RUN=(--distill-max-new-tokens 256 --distill-batch-size 32
       --distill-cache data/train/self_distill/smollm2-135m-instruct-alpaca_data_cleaned_1000
       --checkpoint-every 200
       --batch-size 256 --epochs 2 --max-length 512 --with-reference-answers)
fi
# --resume needs its checkpoint; --overwrite: this script replaces the heads in $OUT.
RESUME=()
if [[ -f "$CHECKPOINT" ]]; then RESUME=(--resume); fi

# shellcheck disable=SC2086
$LAUNCH medusa_engine.training.cli \
  --model smollm2-135m-instruct --dtype bf16 \
  --data "$DATA" --self-distill --distill-temperature 0 \
  --extra-distill-temperature 0.7 --extra-distill-temperature 0.7 \
  --out "$OUT" --overwrite --checkpoint "$CHECKPOINT" ${RESUME[@]+"${RESUME[@]}"} \
  --kind recurrent --num-heads 4 --ffn-size 2048 --draft-vocab 16384 --feature-weight 1.0 \
  --decay 0.8 --lr 1e-3 --warmup-steps 100 --precision fp32 --seed 0 --save-dtype bf16 \
  "${RUN[@]}" "$@"
