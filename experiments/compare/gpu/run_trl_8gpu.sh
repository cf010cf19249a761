#!/usr/bin/env bash
# The comparison at the paper's scale through TRL + vLLM: Qwen3-1.7B-Base on DAPO-Math-17k, one 8-GPU node,
# one command per method. The four runs use the bundled paper presets
# (stapo/configs/paper/qwen3-1.7b-{grpo,20-entropy,justrl,stapo}.yaml), which differ only in `method`.
#
#   bash experiments/compare/gpu/run_trl_8gpu.sh stapo                 # one method, seed 0
#   SEED=1 bash experiments/compare/gpu/run_trl_8gpu.sh grpo max_steps=500
#   DRY_RUN=1 bash experiments/compare/gpu/run_trl_8gpu.sh justrl      # validate and print the command only
#
# Variables: SEED (0), OUT (runs/compare-gpu; the run goes to $OUT/METHOD-seedSEED, the layout
# experiments/compare/run.py --report-only reads), NUM_PROCESSES (8 GPUs), ACCELERATE_CONFIG (the
# bundled FSDP2 config), PYTHON. Extra key=value arguments override config fields for this run.
# Needs: pip install "stapo[trl,vllm]" and network access to the hub (model and data).
set -euo pipefail
usage="usage: run_trl_8gpu.sh METHOD [key=value ...]   (METHOD: grpo | 20-entropy | justrl | stapo)"
METHOD="${1:?$usage}"
shift
case "$METHOD" in
  grpo|20-entropy|justrl|stapo) ;;
  *) echo "run_trl_8gpu.sh: unknown method '$METHOD'; $usage" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
SEED="${SEED:-0}"
OUT="${OUT:-runs/compare-gpu}"
NUM_PROCESSES="${NUM_PROCESSES:-8}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$("$PY" -c 'from stapo.config import BUNDLED_CONFIG_DIR as d; print(d / "accelerate" / "fsdp.yaml")')}"
overrides=("seed=$SEED" "output_dir=$OUT/$METHOD-seed$SEED" "$@")

# Validate the resolved config (field names, types, batch divisibility) before starting 8 processes.
"$PY" -m stapo train "paper/qwen3-1.7b-$METHOD" "${overrides[@]}" --dry-run >/dev/null

cmd=(accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_PROCESSES"
     -m stapo train "paper/qwen3-1.7b-$METHOD" "${overrides[@]}")
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
