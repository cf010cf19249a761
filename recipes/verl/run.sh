#!/usr/bin/env bash
# One paper run on a Ray cluster: STAPO or a baseline, Qwen3-{1.7B,8B,14B}-Base, DAPO-Math-17k.
#
#   METHOD=stapo MODEL=8b DATA_DIR=data/verl bash recipes/verl/run.sh [extra verl overrides...]
#
# METHOD: grpo | 20-entropy | justrl | stapo     MODEL: 1.7b | 8b | 14b
# Optional: MODEL_PATH (local weights), NNODES, GPUS_PER_NODE (8), TOTAL_STEPS (training steps = rollout
# batches; default the table's 1000), DRY_RUN=1 (print the command, one override per line, and exit).
# Extra arguments are appended as verl overrides.
# The overrides come from `python -m stapo.engines.verl.recipe`: the shared setup from the paper's table
# (stapo.paper_setup: 256 prompts x 8, mini-batch 64, prompt 1k / response 15k, AdamW lr 1e-6 after 10
# warm-up steps, grad clip 1.0, T 1.0 / top-p 1.0, no KL / entropy bonus / dynamic sampling), each
# method's loss from its stapo.core preset. recipes/verl/README.md lists them and where verl departs.
set -euo pipefail
: "${METHOD:?set METHOD to grpo, 20-entropy, justrl or stapo}"
: "${MODEL:?set MODEL to 1.7b, 8b or 14b}"
DATA_DIR="${DATA_DIR:-data/verl}"
PY="${PYTHON:-python3}"

args=(--method "$METHOD" --model "$MODEL" --data-dir "$DATA_DIR" --gpus-per-node "${GPUS_PER_NODE:-8}")
[ -n "${TOTAL_STEPS:-}" ] && args+=(--total-steps "$TOTAL_STEPS")
[ -n "${MODEL_PATH:-}" ] && args+=(--model-path "$MODEL_PATH")
[ -n "${NNODES:-}" ] && args+=(--nnodes "$NNODES")
mapfile -t overrides < <("$PY" -m stapo.engines.verl.recipe "${args[@]}")
[ "${#overrides[@]}" -gt 0 ] || { echo "run.sh: no overrides from stapo.engines.verl.recipe" >&2; exit 1; }

if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "$PY -m stapo.engines.verl.main"
  printf '%s\n' "${overrides[@]}" "$@"
  exit 0
fi
exec "$PY" -m stapo.engines.verl.main "${overrides[@]}" "$@"
