"""Recipes compose under verl's Hydra schema; data preparation gives parquet that verl's
RLHFDataset loads; the reward hook scores through verl's reward manager interface."""

from __future__ import annotations

import pytest
from verl_fakes import VERL_MODULE, VERL_SKIP_REASON

pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)

import asyncio
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import verl
from omegaconf import OmegaConf

from stapo.core import get_preset
from stapo.engines.verl.config import POLICY_LOSS_TARGET, VERL_TAU_H_SCOPE, StapoPolicyLossConfig
from stapo.engines.verl.main import apply_stapo_defaults
from stapo.engines.verl.recipe import METHODS, MODELS, loss_overrides, paper_overrides

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "verl"


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


# Every method on one size and every size for STAPO: together they pass every override value.
RUNS = [(m, "8b") for m in METHODS] + [("stapo", "1.7b"), ("stapo", "14b")]


@pytest.mark.parametrize("method,model", RUNS)
def test_paper_recipe_is_accepted_by_verls_schema(method, model):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    cfg = apply_stapo_defaults(compose(paper_overrides(method, model)))
    # what verl's main_ppo runs before launching Ray, then the actor's dataclass as the worker builds it
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    omega_conf_to_dataclass(cfg.algorithm)
    preset = get_preset(method)
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.loss_agg_mode) == (
        preset.clip_low, preset.clip_high, preset.agg)
    assert cfg.actor_rollout_ref.rollout.n == 8 and actor.optim.lr == 1e-6 and actor.entropy_coeff == 0
    assert (actor.optim.lr_warmup_steps, actor.optim.weight_decay) == (10, 0.1)  # the table's optimizer, every method
    assert (actor.optim.clip_grad, actor.optim.lr_scheduler_type) == (1.0, "constant")
    assert actor.clip_ratio_c == (preset.clip_ratio_c or 3.0)  # the preset's dual clip; else verl's default
    assert cfg.data.max_response_length == MODELS[model].max_response_length == 15360  # the paper's 15k
    assert cfg.algorithm.filter_groups.enable is False and cfg.trainer.test_freq == 20
    assert len(cfg.data.val_files) == 6
    if method in ("stapo", "20-entropy"):
        assert actor.calculate_entropy is True
        assert isinstance(actor.policy_loss, StapoPolicyLossConfig)
        assert actor.policy_loss.loss_mode == method
        if method == "stapo":
            s2t = actor.policy_loss.stapo
            assert (s2t.tau_p, s2t.tau_h, s2t.tau_h_quantile) == (0.002, None, 0.75)  # the paper's rule
            assert (s2t.tau_h_population, s2t.tau_h_max) == ("candidates", math.inf)  # Hydra reads `inf`
            # the preset's settings, with the scope the verl plugin provides (the paper's mini_batch)
            assert s2t.s2t == replace(preset.s2t_settings, tau_h_scope=VERL_TAU_H_SCOPE)
        else:
            assert actor.policy_loss.stapo.top_entropy_quantile == 0.2
        external_lib = cfg.actor_rollout_ref.model.external_lib
        assert "stapo.engines.verl" in list(external_lib) + [external_lib]
    else:
        assert actor.policy_loss.loss_mode == "vanilla" and actor.calculate_entropy is False


def test_bad_stapo_values_are_rejected_naming_the_key():
    a = "actor_rollout_ref.actor.policy_loss"
    with pytest.raises(ValueError, match="stapo.tau_p"):
        apply_stapo_defaults(compose([f"{a}.loss_mode=stapo", f"+{a}.stapo.tau_p=1.5"]))
    with pytest.raises(ValueError, match="stapo.tau_h_quantile"):
        apply_stapo_defaults(compose([f"{a}.loss_mode=stapo", f"+{a}.stapo.tau_h_quantile=-0.1"]))
    with pytest.raises(ValueError, match="stapo.tau_h_population must be one of valid, low_prob, candidates"):
        apply_stapo_defaults(compose([f"{a}.loss_mode=stapo", f"+{a}.stapo.tau_h_population=all"]))
    with pytest.raises(ValueError, match="stapo.tau_h must be a number >= 0"):
        apply_stapo_defaults(compose([f"{a}.loss_mode=stapo", f"+{a}.stapo.tau_h=-1.0"]))
    with pytest.raises(ValueError, match="tau_q"):
        apply_stapo_defaults(compose([f"{a}.loss_mode=stapo", f"+{a}.stapo.tau_q=0.1"]))
    with pytest.raises(ValueError, match="loss_mode='vanilla'"):
        apply_stapo_defaults(compose([f"+{a}.stapo.tau_p=0.1"]))
    cfg = apply_stapo_defaults(compose([f"{a}.loss_mode=stapo"]))  # defaults from the preset
    assert cfg.actor_rollout_ref.actor.policy_loss._target_ == POLICY_LOSS_TARGET
    assert cfg.actor_rollout_ref.actor.policy_loss.stapo.tau_p == get_preset("stapo").s2t_settings.tau_p == 0.002


def test_the_stapo_blocks_former_name_is_a_deprecated_alias():
    """`StapoConfig` differed from TRL's `STAPOConfig` only in case; it is `VerlStapoSettings` now, and the
    old name still works for one release, with a DeprecationWarning naming the new one."""
    import stapo.engines.verl as plugin
    import stapo.engines.verl.config as config

    for module in (config, plugin):
        with pytest.warns(DeprecationWarning, match="use VerlStapoSettings"):
            assert module.StapoConfig is config.VerlStapoSettings
    assert "StapoConfig" not in plugin.__all__ and "VerlStapoSettings" in plugin.__all__
    with pytest.raises(AttributeError):
        _ = config.NoSuchName


@pytest.mark.slow  # ~20 s: a fresh interpreter imports verl
def test_run_script_overrides_match_the_recipe_module():
    """recipes/verl/run.sh takes its overrides from `python -m stapo.engines.verl.recipe` (dry run)."""
    env = dict(os.environ, DRY_RUN="1", METHOD="stapo", MODEL="1.7b", DATA_DIR="/data/verl", PYTHON=sys.executable)
    out = subprocess.run(["bash", str(RECIPES / "run.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[-2:] == ["-m", "stapo.engines.verl.main"]
    assert lines[1:] == paper_overrides("stapo", "1.7b", data_dir="/data/verl")
    assert set(loss_overrides("stapo")) <= set(lines)


def test_prepared_parquet_loads_in_verls_rlhf_dataset(tmp_path, qwen3_tokenizer_dir):
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from stapo.engines.verl.data import prepare

    train = tmp_path / "train.jsonl"
    rows = [
        {"id": "a", "problem": "What is $1+1$?", "answer": "2"},
        {"id": "b", "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "answer": "\\frac{3}{4}"},
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "amc23.jsonl").write_text(
        json.dumps({"id": "amc23-1", "problem": "What is $3 \\cdot 4$?", "answer": "12"}) + "\n")
    paths = prepare(str(train), tmp_path / "out", benchmarks=["amc23"], data_dir=bench)
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 256, "truncation": "error",
                               "filter_overlong_prompts": False, "return_raw_chat": False})
    ds = RLHFDataset([str(paths["train"])], tok, config)
    assert len(ds) == 2
    item = ds[1]
    assert item["reward_model"]["ground_truth"] == "\\frac{3}{4}"
    assert item["data_source"] == "dapo_math"
    text = tok.apply_chat_template(item["raw_prompt"], tokenize=False) if "raw_prompt" in item else str(item)
    assert "\\boxed{}" in text and "frac{1}{2}" in text
    val = RLHFDataset([str(paths["amc23"])], tok, config)
    assert val[0]["data_source"] == "amc23" and val[0]["reward_model"]["ground_truth"] == "12"


class _CharTokenizer:
    """Decodes token ids as characters (what a reward manager needs from a tokenizer)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids if int(i) != 0)


def _score_through_naive_manager(response: str, gold: str) -> float:
    import numpy as np
    import torch
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create(
        {"reward": {"custom_reward_function": {"path": "pkg://stapo.rewards", "name": "compute_score"}}})
    fn = get_custom_reward_fn(config)
    ids = torch.tensor([[ord(c) for c in response] + [0, 0]])
    prompt = torch.tensor([[65, 66]])
    data = DataProto.from_dict(
        tensors={"prompts": prompt, "responses": ids,
                 "attention_mask": torch.cat([torch.ones_like(prompt), (ids != 0).long()], dim=1)},
        non_tensors={"data_source": np.array(["amc23"], dtype=object),
                     "reward_model": np.array([{"ground_truth": gold}], dtype=object)},
    )
    manager = NaiveRewardManager(config, _CharTokenizer(), fn)
    if not manager.loop.is_running():
        result = manager.loop.run_until_complete(manager.run_single(data))
    else:
        result = asyncio.run(manager.run_single(data))
    return result["reward_score"]


def test_reward_hook_scores_through_verls_reward_manager():
    assert _score_through_naive_manager("so the sum is \\boxed{\\frac{3}{4}}", "\\frac{3}{4}") == 1.0
    assert _score_through_naive_manager("so the sum is \\boxed{0.75}", "\\frac{3}{4}") == 1.0
    assert _score_through_naive_manager("so the sum is \\boxed{\\frac{2}{3}}", "\\frac{3}{4}") == 0.0
