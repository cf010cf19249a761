#!/usr/bin/env bash
# The verl plugin on a GPU, end to end: 2 training steps of the paper's verl recipe (recipes/verl/run.sh:
# Ray, vLLM rollouts, verl's FSDP actor with loss_mode=stapo, the plugin's hook and mini-batch pre-pass)
# on a tiny model and a tiny batch, writing under OUT_DIR:
#
#     env.txt          Python, torch, CUDA device, verl / vLLM / Ray versions (or why not importable; not in --dry-run)
#     data/            the training parquet (python -m stapo.engines.verl.data, a synthetic addition task)
#     command.txt      the launch command, one override per line (run.sh's DRY_RUN output)
#     verl_check.log   verl's output; the check passes when it reaches step 2 with actor/s2t_* metrics
#
#     bash scripts/gpu_check_verl.sh OUT_DIR              # one GPU with vLLM and Ray (~5-10 min)
#     bash scripts/gpu_check_verl.sh OUT_DIR --dry-run    # data + command only: no GPU needed (the tests)
#
# Environment: METHOD (stapo; or grpo, 20-entropy, justrl), MODEL_PATH (default: the embedded model,
# stapo.models.embedded_model_dir(), a 135M Llama with a chat template), GPUS (1), LIMIT (seconds, 1200),
# PYTHON (python3). Exit status: 0 passed, 1 failed, 2 not runnable here (no GPU / vLLM / Ray / verl).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check_verl.sh OUT_DIR [--dry-run]}
MODE=${2:-run}
case "$MODE" in run|--dry-run) ;; *) echo "usage: scripts/gpu_check_verl.sh OUT_DIR [--dry-run]" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
METHOD=${METHOD:-stapo}
GPUS=${GPUS:-1}
LIMIT=${LIMIT:-1200}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/verl_check.log"
: >"$LOG"

# The training prompts: offline, deterministic (verl's RLHFDataset columns; docs/verl.md "Data").
"$PY" -m stapo.engines.verl.data --train "synthetic:add1?n=64&seed=0" --out "$OUT/data" --benchmarks none \
  >>"$LOG" 2>&1 || { echo "gpu_check_verl: data preparation failed (see $LOG)" | tee -a "$LOG"; exit 1; }

if [ "$MODE" = "run" ]; then
  "$PY" scripts/env_report.py verl vllm ray transformers trl stapo >"$OUT/env.txt" 2>&1
  tee -a "$LOG" <"$OUT/env.txt"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check_verl: no CUDA device: not runnable here" | tee -a "$LOG"; exit 2
  fi
  if ! "$PY" -c "import verl, vllm, ray" >>"$LOG" 2>&1; then
    echo "gpu_check_verl: verl, vLLM and Ray must import (pip install 'stapo[verl]' vllm): not runnable here" \
      | tee -a "$LOG"; exit 2
  fi
  # verl 0.9.1's FSDP engine imports trl's AutoModelForCausalLMWithValueHead whenever trl is importable;
  # TRL 1.x has none, and the model build fails (docs/verl.md, "Supported versions").
  if ! "$PY" - >>"$LOG" 2>&1 <<'PYEOF'
import importlib.util, sys
if importlib.util.find_spec("trl") is None:
    sys.exit(0)
try:
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead  # noqa: F401
except ImportError:
    try:
        from trl import AutoModelForCausalLMWithValueHead  # noqa: F401
    except ImportError:
        sys.exit(1)
PYEOF
  then
    echo "gpu_check_verl: trl is installed without AutoModelForCausalLMWithValueHead, which verl 0.9.1's FSDP" \
      "engine imports: use an environment without trl (pip install 'stapo[verl]'): not runnable here" | tee -a "$LOG"
    exit 2
  fi
  if [ -z "${MODEL_PATH:-}" ]; then
    MODEL_PATH=$("$PY" -c "from stapo.models import embedded_model_dir; print(embedded_model_dir(progress=False))") \
      || { echo "gpu_check_verl: the embedded model is not available; set MODEL_PATH" | tee -a "$LOG"; exit 2; }
  fi
fi
MODEL_PATH=${MODEL_PATH:-embedded-model}  # --dry-run: the command only

# A tiny run of the paper recipe: 8 prompts x 4 responses per training step, 2 PPO mini-batches of 16
# responses, each cut into several micro-batches by the token budget (so STAPO's mini-batch pre-pass runs),
# no validation, no checkpoints. Everything else is the recipe's (the paper's loss and optimizer).
A=actor_rollout_ref.actor
R=actor_rollout_ref.rollout
SMALL=(
  data.train_batch_size=8
  "data.val_files=$OUT/data/train.parquet"
  data.max_prompt_length=256
  data.max_response_length=128
  "$A.ppo_mini_batch_size=4"
  "$A.ppo_max_token_len_per_gpu=1024"
  "$A.optim.lr_warmup_steps=0"
  "$R.n=4"
  "$R.tensor_model_parallel_size=1"
  "$R.gpu_memory_utilization=0.3"
  "$R.log_prob_max_token_len_per_gpu=2048"
  "$R.max_model_len=512"
  actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=2048
  trainer.val_before_train=False
  trainer.test_freq=-1
  trainer.save_freq=-1
  "trainer.logger=[console]"
  "trainer.default_local_dir=$OUT/checkpoints"
  trainer.experiment_name=gpu-check-verl
)
RUN_ENV=(METHOD="$METHOD" MODEL=1.7b MODEL_PATH="$MODEL_PATH" DATA_DIR="$OUT/data" NNODES=1 GPUS_PER_NODE="$GPUS"
         TOTAL_STEPS=2 PYTHON="$PY")
env "${RUN_ENV[@]}" DRY_RUN=1 bash recipes/verl/run.sh "${SMALL[@]}" >"$OUT/command.txt" \
  || { echo "gpu_check_verl: recipes/verl/run.sh DRY_RUN failed" | tee -a "$LOG"; exit 1; }
if [ "$MODE" = "--dry-run" ]; then
  cat "$OUT/command.txt"
  exit 0
fi

echo "== recipes/verl/run.sh METHOD=$METHOD, 2 steps (limit ${LIMIT}s)" | tee -a "$LOG"
timeout -k 30 "$LIMIT" env "${RUN_ENV[@]}" bash recipes/verl/run.sh "${SMALL[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "gpu_check_verl: the run exited $rc (124: time limit)" | tee -a "$LOG"; exit 1
fi
if ! grep -q "step:2 " "$LOG"; then
  echo "gpu_check_verl: verl did not log training step 2" | tee -a "$LOG"; exit 1
fi
if [ "$METHOD" = "stapo" ] && ! grep -q "actor/s2t_masked_count" "$LOG"; then
  echo "gpu_check_verl: no actor/s2t_* metric in verl's log: the plugin's loss did not run" | tee -a "$LOG"; exit 1
fi
echo "gpu_check_verl: passed" | tee -a "$LOG"
