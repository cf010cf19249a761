#!/usr/bin/env bash
# The comparison at the paper's scale through verl: Qwen3-1.7B-Base on DAPO-Math-17k, one 8-GPU node,
# one command per method, through the recipe in recipes/verl/ (settings from `python -m stapo.engines.verl.recipe`;
# the methods differ only in the loss settings of stapo.core's presets).
#
#   python -m stapo.engines.verl.data --train BytedTsinghua-SIA/DAPO-Math-17k --out data/verl    # once
#   bash experiments/compare/gpu/run_verl.sh stapo
#   DRY_RUN=1 bash experiments/compare/gpu/run_verl.sh grpo           # print the command only
#
# Variables: MODEL (1.7b), DATA_DIR (data/verl), and the others of recipes/verl/run.sh (MODEL_PATH,
# NNODES, GPUS_PER_NODE, TOTAL_STEPS, PYTHON). Extra arguments are appended as verl overrides.
# Needs: pip install 'stapo[verl]' vllm, and a running Ray head (`ray start --head`).
set -euo pipefail
usage="usage: run_verl.sh METHOD [verl overrides ...]   (METHOD: grpo | 20-entropy | justrl | stapo)"
METHOD="${1:?$usage}"
shift
case "$METHOD" in
  grpo|20-entropy|justrl|stapo) ;;
  *) echo "run_verl.sh: unknown method '$METHOD'; $usage" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
METHOD="$METHOD" MODEL="${MODEL:-1.7b}" DATA_DIR="${DATA_DIR:-data/verl}" exec bash "$ROOT/recipes/verl/run.sh" "$@"
