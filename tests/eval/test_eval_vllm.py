"""`stapo eval --backend vllm` for real, on the embedded model, with vLLM's CPU build.

vLLM lives in its own venv (.venv-vllm, `scripts/setup.sh vllm`; `setup.sh dev` builds it too): its
transformers/numpy pins conflict with verl's. tests/eval/vllm_checks.py runs there once per session — one
vLLM engine start for every check — and writes a JSON of raw observations that these tests judge.
Set STAPO_VLLM_PYTHON to use another interpreter that has vLLM.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from vllm_venv import needs_vllm_venv, run_checks

CHECKS = Path(__file__).resolve().parent / "vllm_checks.py"
CHECKS_TIMEOUT_S = 1500  # engine start + ~1k generated tokens on a busy 2-core machine, with headroom

pytestmark = [
    pytest.mark.slow,
    # the first test runs the checks' subprocess (the module fixture `eval_checks`): the inner limit, then a
    # minute for the judging, before pytest-timeout (600 s for the rest of the suite) stops the test
    pytest.mark.timeout(CHECKS_TIMEOUT_S + 60),
    needs_vllm_venv,
]


@pytest.fixture(scope="module")
def eval_checks(tmp_path_factory, benchmark_files):
    work = tmp_path_factory.mktemp("vllm")
    # without the benchmark files, vllm_checks.py writes six small problems of its own
    env = {"STAPO_DATA_DIR": str(benchmark_files)} if benchmark_files is not None else {}
    data = run_checks(CHECKS, work / "report.json", work / "runs", CHECKS_TIMEOUT_S, env)
    sys.stderr.write(f"vllm checks: {json.dumps(data['info'])}\n")
    return data


def test_vllm_is_the_cpu_build_in_float32(eval_checks):
    info = eval_checks["info"]
    assert info["backend"] == "vllm" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["vllm_version"].startswith("0.31")


def test_greedy_matches_hf_generate(eval_checks):
    """T = 0: vLLM's completions are HF generate's, token for token. fp32 on both sides, but different
    attention/matmul kernels: a row may diverge where the top two logits are (nearly) tied. Such a
    divergence is allowed only at a near-tie (HF's logits of both tokens within 1e-3 of each other and of
    the max), in at most one row of six, after >= 8 identical tokens."""
    g = eval_checks["greedy"]
    assert len(g["vllm"]) == len(g["hf"]) == 6
    assert all(len(h) > 0 for h in g["hf"])
    diverged = [(i, gap) for i, gap in enumerate(g["gaps"]) if gap is not None]
    for i, gap in diverged:
        assert gap["position"] >= 8, f"row {i} diverges at token {gap['position']}: {gap}"
        assert abs(gap["logit_hf_token"] - gap["logit_vllm_token"]) < 1e-3, f"row {i}: not a near-tie: {gap}"
        assert gap["logit_max"] - gap["logit_vllm_token"] < 1e-3, f"row {i}: vLLM did not take a top token: {gap}"
    assert len(diverged) <= 1, f"{len(diverged)} of 6 greedy rows differ: {diverged}"
    for (i, _gap) in [(i, g) for i, g in enumerate(g["gaps"]) if g is None]:
        assert g["vllm"][i] == g["hf"][i]


def test_sampling_is_reproducible_per_seed(eval_checks):
    s = eval_checks["sampled"]
    assert len(s["together"]) == 12
    # a sample depends on its own (prompt, seed) only: not on the batch it is generated in
    assert s["reversed"] == s["together"]
    assert s["alone"] == s["together"][:3]
    # ... and the seed matters: other seeds give other completions (24 tokens at T = 0.7-1.0)
    differing = sum(a != b for a, b in zip(s["other_seeds"], s["together"]))
    assert differing >= 10, f"only {differing} of 12 completions changed with the seed"
    # the two T = 1.0 requests of one prompt (different seeds) differ
    assert sum(s["together"][3 * i] != s["together"][3 * i + 2] for i in range(4)) >= 3


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_resumed_run_equals_uninterrupted_run(eval_checks, backend):
    """`stapo eval` (the CLI) killed after 1 of 4 samples (a torn line after it) and rerun generates
    exactly the 3 missing samples, and ends with the samples and scores of an uninterrupted run."""
    st = eval_checks["store"][backend]
    assert st["rc"] == [0, 0]
    assert st["backend_info"]["backend"] == backend
    assert st["resume_generated"] == 3 and st["straight_generated"] == 4
    assert len(st["resumed"]) == 4
    assert st["resumed"] == st["straight"]
    assert st["results_resumed"] == st["results_straight"]


def test_both_backends_share_the_sample_protocol(eval_checks):
    """The same samples (keys and per-sample seeds) under both backends; the completions differ, as
    each backend draws from its own random stream (stapo.eval.backends)."""
    v, h = eval_checks["store"]["vllm"]["straight"], eval_checks["store"]["hf"]["straight"]
    assert v.keys() == h.keys()
    assert all(v[k]["seed"] == h[k]["seed"] for k in v)
    assert all(r["completion_tokens"] <= 16 for r in (*v.values(), *h.values()))
