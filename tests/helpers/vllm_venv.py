"""Checks that run in the vLLM venv (imported by name: `from vllm_venv import ...`).

vLLM lives in its own venv (.venv-vllm; `scripts/setup.sh vllm`, `setup.sh dev` builds it too): its
transformers/numpy pins conflict with verl's. A test module runs its checks script there once, from
the main venv, and asserts on the JSON it writes.

    VLLM_PYTHON                                  that venv's python (STAPO_VLLM_PYTHON overrides it)
    needs_vllm_venv                              skipif mark: no such python
    run_checks(script, out, work, timeout_s)     runs `script OUT.json WORK_DIR` there; returns the JSON
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("STAPO_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))

needs_vllm_venv = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"no vLLM venv at {VLLM_PYTHON}: run scripts/setup.sh vllm (setup.sh dev builds it)")


def run_checks(script: Path, out: Path, work: Path, timeout_s: int,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `script OUT.json WORK_DIR` with the vLLM venv's python (stapo from src/, `env` added) and
    return the JSON it wrote; the test fails with the script's output tails if it did not finish."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full_env.pop("PYTHONHOME", None)
    proc = subprocess.run([str(VLLM_PYTHON), str(script), str(out), str(work)],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"{Path(script).relative_to(REPO)} failed (rc {proc.returncode}):\n"
                    f"{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}")
    return json.loads(out.read_text())
