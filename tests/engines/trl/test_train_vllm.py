"""`stapo train ... use_vllm=true` for real on a CPU: rollouts from vLLM's CPU build, colocated with the
trainer (stapo.engines.trl.vllm), on the embedded model.

Like tests/eval/test_eval_vllm.py: vLLM lives in its own venv (.venv-vllm; `scripts/setup.sh dev` builds
it), tests/engines/trl/vllm_train_checks.py runs there once — one `stapo train` run, one engine start — and
writes the raw observations these tests judge. STAPO_VLLM_PYTHON selects another interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from vllm_venv import needs_vllm_venv, run_checks

CHECKS = Path(__file__).resolve().parent / "vllm_train_checks.py"
CHECKS_TIMEOUT_S = 900  # engine start + 2 steps of 16 x 32-token rollouts: ~1.5 min alone on 2 cores

# Both sides run float32 with different kernels: per-token log-probs of the same weights agree to
# ~3e-5 nats here (measured); a weight the sync missed shows up as >= 0.05 (the stale tied LM head).
FOLLOW_TOL = 2e-3
# The rollout gap is a mean over a step's completion tokens (~1e-5 measured with working syncs).
ROLLOUT_GAP_TOL = 1e-3

# the module fixture's subprocess runs under the first test: a minute above its own limit
pytestmark = pytest.mark.timeout(CHECKS_TIMEOUT_S + 60)


def test_use_vllm_without_vllm_is_one_clear_error_before_the_model_loads(tmp_path):
    """In a venv without vLLM (the main one): a ValueError naming the fix, before the model path is read."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this venv")
    from stapo.engines.trl import STAPOConfig, STAPOTrainer

    args = STAPOConfig(output_dir=str(tmp_path), use_vllm=True, use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(ValueError, match=r"use_vllm=true needs vLLM .*scripts/setup.sh vllm"):
        STAPOTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=[lambda **_: [0.0]], args=args)


@pytest.fixture(scope="module")
def train_checks(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_train")
    data = run_checks(CHECKS, work / "report.json", work, CHECKS_TIMEOUT_S)
    sys.stderr.write(f"vllm train checks: {json.dumps(data['info'])}, train {data['train_s']:.1f} s\n")
    return data


def _max_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.slow
@needs_vllm_venv
def test_the_run_took_real_optimizer_steps(train_checks):
    assert train_checks["rc"] == 0
    assert train_checks["global_step"] == 2
    assert train_checks["engine"] == {"dtype": "torch.float32", "enforce_eager": True}
    steps = [m for m in train_checks["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["stapo/nonfinite_steps"] == 0 for m in steps)
    lp = train_checks["logprobs"]
    # the weights changed: a fixed completion's log-probs under the trained model moved (nats per token)
    assert _max_gap(lp["before"]["trainer"], lp["after"]["trainer"]) > 50 * FOLLOW_TOL


@pytest.mark.slow
@needs_vllm_venv
def test_weights_are_synced_before_each_rollout_and_after_the_last_step(train_checks):
    # TRL: before the rollouts of steps 1 and 2 (global step 0, 1); stapo: at the end of the run (2)
    assert train_checks["sync_steps"] == [0, 1, 2]


@pytest.mark.slow
@needs_vllm_venv
def test_vllm_log_probs_follow_the_trained_model(train_checks):
    lp = train_checks["logprobs"]
    assert _max_gap(lp["before"]["vllm"], lp["before"]["trainer"]) < FOLLOW_TOL
    assert _max_gap(lp["after"]["vllm"], lp["after"]["trainer"]) < FOLLOW_TOL
    assert _max_gap(lp["before"]["vllm"], lp["after"]["vllm"]) > 50 * FOLLOW_TOL


@pytest.mark.slow
@needs_vllm_venv
def test_rollout_logprob_gap_is_logged_per_step(train_checks):
    steps = [m for m in train_checks["metrics"] if "loss" in m]
    for m in steps:
        gap = m["stapo/rollout_logprob_gap"]
        assert gap == m["sampling/sampling_logp_difference/mean"]
        assert math.isfinite(gap) and 0.0 <= gap < ROLLOUT_GAP_TOL, m
    # the S2T statistics still come from the trainer's own log-probs/entropies
    assert all(m["stapo/s2t_applied"] == 1 and m["stapo/completion_tokens"] > 0 for m in steps)


@pytest.mark.slow
@needs_vllm_venv
def test_server_mode_is_refused_on_the_cpu_build(train_checks):
    error = train_checks["server_mode_error"]
    assert "needs CUDA" in error and "vllm_mode=colocate" in error


@pytest.mark.slow
@needs_vllm_venv
def test_every_private_symbol_the_engine_relies_on_is_there_with_vllm(train_checks):
    """With vLLM's CPU build, colocated: every symbol of stapo.engines.trl.internals is checked on the trained
    trainer (the vLLM engine's weight-sync chain included) and none is missing or changed."""
    from stapo.engines.trl.internals import INTERNALS

    assert train_checks["internals"]["problems"] == []
    assert sorted(train_checks["internals"]["checked"]) == sorted(item.name() for item in INTERNALS)
