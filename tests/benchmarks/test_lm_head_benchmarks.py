"""The lm-head benchmark scripts run end to end at toy sizes (numbers are not checked, shapes and exactness are)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.pop("STAPO_LM_HEAD_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def _rows(out, prefix):
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith(prefix)]


@pytest.mark.slow  # ~15 s alone on 2 cores (two fresh interpreters, transformers import)
def test_gpu_script_tiny_cpu_smoke():
    pytest.importorskip("transformers")
    out = _run(["benchmarks/gpu_lm_head.py", "--tiny"], timeout=240)
    stapo = _rows(out, "| stapo")
    trl_style = _rows(out, "| trl-style")
    matmul = _rows(out, "| matmul-3")
    assert len(stapo) == 4 and len(trl_style) == 2 and len(matmul) == 2  # two hidden sizes
    for row in stapo:
        assert float(row[2]) > 0 and float(row[4]) > 0 and float(row[5]) > 0  # time and both ratios
        # exact path: float32-level error against float64 of the same bf16 inputs
        assert float(row[6]) < 1e-4 and float(row[7]) < 1e-4, row
        assert float(row[8]) < 4e-3, row  # grad_h is returned in bf16: one rounding, 2^-9 relative
    for row in trl_style:  # bf16 logits: visibly less exact, so the Δ columns measure something
        assert float(row[6]) > 1e-3, row
    steps = _rows(out, "| qwen3 step")
    assert len(steps) == 2 and all(re.match(r"^[0-9.]+$", r[2]) for r in steps), steps


@pytest.mark.slow  # ~40 s on 2 cores: three subprocesses, each importing trl
def test_cpu_benchmark_small_run():
    pytest.importorskip("trl")
    out = _run(["benchmarks/bench_lm_head_cpu.py", "--tokens", "64", "--vocab", "2048", "--hidden", "32"],
               timeout=240)
    rows = {r[0]: r for r in _rows(out, "| ") if r[0] in ("stapo", "trl-fused", "trl-logits")}
    assert set(rows) == {"stapo", "trl-fused", "trl-logits"}
    # Same inputs, same answers: the summed log-probs and entropies agree across the three paths.
    for col in (7, 8):
        vals = [float(r[col]) for r in rows.values()]
        assert max(vals) - min(vals) <= 1e-3 * max(1.0, abs(vals[0])), vals
