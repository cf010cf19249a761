"""The paper configs (TRL) and the verl recipes follow the one table of the paper's setup, `stapo.paper_setup`.

Every `stapo/configs/paper/*.yaml` is read through `load_config` (so it is also validated) and resolved to
the `STAPOConfig` a run gets; every verl recipe (methods x model sizes) is read as `run.sh` reads it, the
printed overrides, parsed with Hydra's override grammar. Both are compared with the table, and each
method's own settings with its `stapo.core` preset. The checks are functions, so the last tests can feed
them a deliberately wrong value and see them fail.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stapo.config import BUNDLED_CONFIG_DIR, load_config, stapo_config_fields
from stapo.core import PRESETS, S2T_READINGS, TOKEN_FILTERS, get_preset
from stapo.paper_setup import EVAL, METHODS, MODELS, TRAINING, TRL_GPUS, eval_args, trl_steps

REPO = Path(__file__).resolve().parents[1]
PAPER_DIR = BUNDLED_CONFIG_DIR / "paper"
PAPER_CONFIGS = sorted(PAPER_DIR.glob("*.yaml"))
RUNS = [(m, s) for s in MODELS for m in METHODS]


def _split_name(path: Path) -> tuple[str, str]:
    """qwen3-<size>-<method>.yaml -> (method, size)."""
    stem = path.stem
    assert stem.startswith("qwen3-"), stem
    size, _, method = stem[len("qwen3-"):].partition("-")
    return method, size


# ------------------------------------------------------------------------------------------ the table


def test_the_table_holds_the_papers_numbers():
    t = TRAINING
    assert (t.train_batch_prompts, t.responses_per_prompt, t.mini_batch_prompts) == (256, 8, 64)
    assert t.optimizer_steps_per_rollout == 4 and t.rollout_responses == 2048 and t.mini_batch_responses == 512
    assert (t.max_prompt_length, t.max_response_length, t.max_sequence_length) == (1024, 15360, 16384)
    assert math.isclose(1 - t.clip_low, 0.8) and math.isclose(1 + t.clip_high, 1.28)
    assert (t.grad_clip, t.optimizer, t.learning_rate, t.lr_schedule, t.warmup_steps) == (
        1.0, "AdamW", 1e-6, "constant", 10)
    assert (t.temperature, t.top_p, t.kl_coef, t.entropy_coef, t.dynamic_sampling) == (1.0, 1.0, 0.0, 0.0, False)
    assert dict(EVAL.samples) == {"aime24": 32, "aime25": 32, "amc23": 32,
                                  "math500": 4, "minerva": 4, "olympiadbench": 4}
    assert EVAL.max_new_tokens == 20480 and dict(EVAL.settings) == {"train": (1.0, 1.0), "nucleus": (0.7, 0.9)}
    assert trl_steps(10) == 40
    assert set(METHODS) == {"grpo", "20-entropy", "justrl", "stapo"}
    assert set(MODELS) == {"1.7b", "8b", "14b"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_methods_own_settings_are_its_preset(method):
    """The table's per-method settings (the baselines' own papers) are what the preset applies."""
    s, p = METHODS[method], get_preset(method)
    assert (p.clip_low, p.clip_high, p.clip_ratio_c, p.agg) == (s.clip_low, s.clip_high, s.clip_ratio_c, s.agg)
    assert p.token_filter == s.token_filter and p.advantage_scale == "group"
    assert p.top_entropy_quantile == s.top_entropy_quantile
    assert p.filter.uses_top_entropy_quantile == (s.top_entropy_quantile is not None)
    if p.filter.applies_s2t:
        assert p.s2t_settings == S2T_READINGS[s.s2t_reading]
    else:
        assert s.s2t_reading is None
    # a baseline that departs from the shared table (its clip range, or a filter other than STAPO's)
    # says where and why
    departs = ((s.clip_low, s.clip_high) != (TRAINING.clip_low, TRAINING.clip_high)
               or (s.token_filter != "none" and not p.filter.applies_s2t))
    assert bool(s.differences) == departs, (method, s.differences)
    assert s.source


def test_the_table_is_plain_data_and_not_imported_by_the_core():
    import ast

    import stapo.paper_setup

    tree = ast.parse(Path(stapo.paper_setup.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.split(".")[0] == "stapo"], imported
    code = "import sys, stapo.core; assert 'stapo.paper_setup' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------------ TRL paper configs


def check_trl_config(path: Path) -> None:
    """Raise AssertionError where the paper config `path` departs from the table."""
    from stapo.train import build_stapo_config

    method, size = _split_name(path)
    assert method in METHODS and size in MODELS, path.name
    run = load_config(path)  # validates every field
    raw = yaml.safe_load(path.read_text())
    t = run.trl
    assert run.model == MODELS[size] and run.method == method
    # batch: 256 prompts x 8 per generation, 64 prompts per optimizer step, on TRL_GPUS processes
    pdb, ga, spg = t["per_device_train_batch_size"], t["gradient_accumulation_steps"], t["steps_per_generation"]
    assert t["num_generations"] == TRAINING.responses_per_prompt
    assert pdb * TRL_GPUS * ga == TRAINING.mini_batch_responses, (pdb, ga)
    assert pdb * TRL_GPUS * spg == TRAINING.rollout_responses, (pdb, spg)
    assert spg // ga == TRAINING.optimizer_steps_per_rollout and spg % ga == 0
    assert t["num_iterations"] == TRAINING.ppo_epochs
    # lengths
    assert t["max_completion_length"] == TRAINING.max_response_length
    if "max_prompt_length" in stapo_config_fields():  # TRL 1.16 has none; a TRL that has it must get 1k
        assert t.get("max_prompt_length") == TRAINING.max_prompt_length
    # sampling, optimizer, regularisers
    assert (t["temperature"], t["top_p"]) == (TRAINING.temperature, TRAINING.top_p)
    assert str(t["optim"]).startswith(TRAINING.optimizer.lower())
    assert t["learning_rate"] == TRAINING.learning_rate
    assert t["lr_scheduler_type"] == f"{TRAINING.lr_schedule}_with_warmup"
    assert t["warmup_steps"] == trl_steps(TRAINING.warmup_steps)
    assert t["weight_decay"] == TRAINING.weight_decay
    assert t["max_grad_norm"] == TRAINING.grad_clip
    assert t["beta"] == TRAINING.kl_coef and t["entropy_coef"] == TRAINING.entropy_coef
    assert t["vllm_importance_sampling_correction"] is TRAINING.rollout_importance_correction
    assert t["max_steps"] == trl_steps(TRAINING.training_steps)
    # the file carries every one of these itself (not a default that could change under it)
    for key in ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                "num_iterations", "max_completion_length", "temperature", "top_p", "optim", "learning_rate",
                "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "beta", "entropy_coef",
                "max_steps", "vllm_importance_sampling_correction"):
        assert key in raw, f"{path.name}: {key} is not set explicitly"
    # the method's own settings: none in the file (the four configs of a size differ only in `method`),
    # all from the preset, as the run resolves them
    for key in ("epsilon", "epsilon_high", "clip_ratio_c", "top_entropy_quantile", "loss_type"):
        assert key not in raw, f"{path.name}: {key} belongs to the preset"
    cfg = build_stapo_config(run)
    own = METHODS[method]
    assert (cfg.epsilon, cfg.epsilon_high, cfg.clip_ratio_c) == (own.clip_low, own.clip_high, own.clip_ratio_c)
    assert cfg.loss_type == "dapo" and own.agg == "token-mean"  # token-level: TRL's "dapo" loss
    assert (cfg.beta, cfg.entropy_coef, cfg.max_grad_norm) == (0.0, 0.0, TRAINING.grad_clip)
    assert cfg.top_entropy_quantile == (own.top_entropy_quantile or 1.0)
    if own.s2t_reading is not None:
        assert cfg.s2t_settings == S2T_READINGS[own.s2t_reading]  # the paper's rule, per mini-batch
    # the evaluation command in the header: the paper's protocol on this run's final model
    lines = [line for line in path.read_text().splitlines() if line.lstrip("# ").startswith("stapo eval")]
    assert len(lines) == 1, f"{path.name}: one `stapo eval` line expected"
    args = lines[0].lstrip("# ").split()
    assert args[args.index("--model") + 1] == f"{run.output_dir}/final"
    assert " ".join(eval_args()) in lines[0]


def test_every_paper_config_is_there():
    assert sorted(_split_name(p) for p in PAPER_CONFIGS) == sorted(RUNS)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_follows_the_table(path):
    check_trl_config(path)


# ------------------------------------------------------------------------------------------ verl recipes

def _has_verl() -> bool:
    import importlib.util

    return importlib.util.find_spec("verl") is not None


def _recipe():
    pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (pip install 'verl==0.9.1')")
    from stapo.engines.verl import recipe

    return recipe


def printed_overrides(method: str, size: str, capsys) -> list[str]:
    """What `python -m stapo.engines.verl.recipe` prints (run.sh passes these lines to verl)."""
    capsys.readouterr()
    assert _recipe().main(["--method", method, "--model", size]) == 0
    return capsys.readouterr().out.splitlines()


def parse_overrides(lines: list[str]) -> dict:
    """Hydra override lines -> {key: typed value}; the values as Hydra reads them (`inf`, `null`, lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(lines)
    out = {}
    for o in parsed:
        assert o.key_or_group not in out, f"{o.key_or_group} set twice"
        out[o.key_or_group] = o.value()
    return out


def check_verl_overrides(lines: list[str], method: str, size: str) -> None:
    """Raise AssertionError where the verl recipe's overrides depart from the table."""
    from stapo.data import BENCHMARKS
    from stapo.engines.verl.config import S2T_KEYS, VERL_TAU_H_SCOPE

    recipe = _recipe()
    o = parse_overrides(lines)
    a, r = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    t, own = TRAINING, METHODS[method]
    assert o["actor_rollout_ref.model.path"] == MODELS[size]
    # batch (verl counts prompts; rollout.n responses each)
    assert o["data.train_batch_size"] == t.train_batch_prompts and o[f"{r}.n"] == t.responses_per_prompt
    assert o[f"{a}.ppo_mini_batch_size"] == t.mini_batch_prompts and o[f"{a}.ppo_epochs"] == t.ppo_epochs
    # lengths, every model size the same
    assert o["data.max_prompt_length"] == t.max_prompt_length and o["data.filter_overlong_prompts"] is True
    assert o["data.max_response_length"] == t.max_response_length == recipe.MODELS[size].max_response_length
    assert o[f"{a}.ppo_max_token_len_per_gpu"] >= t.max_sequence_length
    assert o[f"{r}.log_prob_max_token_len_per_gpu"] >= t.max_sequence_length
    # optimizer
    assert o[f"{a}.optim.optimizer"] == t.optimizer and o[f"{a}.optim.lr"] == t.learning_rate
    assert o[f"{a}.optim.lr_scheduler_type"] == t.lr_schedule and o[f"{a}.optim.lr_warmup_steps"] == t.warmup_steps
    assert o[f"{a}.optim.weight_decay"] == t.weight_decay and o[f"{a}.optim.clip_grad"] == t.grad_clip
    assert o["trainer.total_training_steps"] == t.training_steps
    # sampling; no KL, no entropy bonus, no dynamic sampling
    assert (o[f"{r}.temperature"], o[f"{r}.top_p"]) == (t.temperature, t.top_p)
    assert o["algorithm.use_kl_in_reward"] is False and o[f"{a}.use_kl_loss"] is False and t.kl_coef == 0
    assert o[f"{a}.entropy_coeff"] == t.entropy_coef
    assert o["algorithm.filter_groups.enable"] is t.dynamic_sampling
    # no rollout importance weights (verl's default; the plugin's losses refuse them)
    assert not t.rollout_importance_correction
    assert all(v is None for k, v in o.items() if k.startswith("algorithm.rollout_correction.rollout_is")), o
    assert o["algorithm.adv_estimator"] == "grpo" and o["algorithm.norm_adv_by_std_in_grpo"] is True
    # the method's own settings
    assert (o[f"{a}.clip_ratio_low"], o[f"{a}.clip_ratio_high"]) == (own.clip_low, own.clip_high)
    assert o.get(f"{a}.clip_ratio_c") == own.clip_ratio_c  # absent: verl's default bound 3 (it has no "none")
    assert o[f"{a}.loss_agg_mode"] == own.agg
    spec = TOKEN_FILTERS[own.token_filter]
    assert o[f"{a}.policy_loss.loss_mode"] == recipe.VERL_LOSS_MODES[own.token_filter]
    stapo_keys = {k.rsplit(".", 1)[1]: v for k, v in o.items() if k.startswith(f"{a}.policy_loss.stapo.")}
    if spec.applies_s2t:
        paper = S2T_READINGS[own.s2t_reading]
        expected = {name: getattr(paper, name) for name in S2T_KEYS}
        expected["tau_h_scope"] = VERL_TAU_H_SCOPE  # the scope the verl plugin provides
        assert stapo_keys == expected
        assert stapo_keys["tau_h_max"] == math.inf  # Hydra reads the printed `inf` as a float
    elif spec.uses_top_entropy_quantile:
        assert stapo_keys == {"top_entropy_quantile": own.top_entropy_quantile}
    else:
        assert stapo_keys == {}
    # in-run validation: the six benchmarks every EVAL.every_steps training steps, the training-aligned
    # setting; one n for every benchmark (verl's val_kwargs), the N of the large ones
    assert [Path(f).stem for f in o["data.val_files"]] == list(BENCHMARKS) == list(EVAL.samples)
    assert o["trainer.test_freq"] == EVAL.every_steps
    assert o[f"{r}.val_kwargs.do_sample"] is True
    assert (o[f"{r}.val_kwargs.temperature"], o[f"{r}.val_kwargs.top_p"]) == EVAL.settings["train"]
    assert o[f"{r}.val_kwargs.n"] == min(EVAL.samples.values())


@pytest.mark.parametrize("method,size", RUNS)
def test_verl_recipe_follows_the_table(method, size, capsys):
    check_verl_overrides(printed_overrides(method, size, capsys), method, size)


def test_verl_loss_modes_follow_the_filters_properties():
    recipe = _recipe()
    from stapo.engines.verl.config import LOSS_MODES

    assert set(recipe.VERL_LOSS_MODES) == set(TOKEN_FILTERS)
    for name, spec in TOKEN_FILTERS.items():
        mode = recipe.VERL_LOSS_MODES[name]
        assert (mode == "stapo") == spec.applies_s2t
        assert (mode == "20-entropy") == spec.uses_top_entropy_quantile
        assert mode == "vanilla" or mode in LOSS_MODES
    assert set(recipe.METHODS) == set(METHODS) and set(recipe.MODELS) == set(MODELS)
    assert all(m in PRESETS for m in recipe.METHODS)


# ------------------------------------------------------------------------------------------ evaluation


def test_stapo_evals_defaults_are_the_papers_protocol():
    from stapo.cli import build_parser
    from stapo.data import BENCHMARKS
    from stapo.eval.protocol import DEFAULT_SAMPLES, SETTING_GROUPS, SETTINGS

    assert DEFAULT_SAMPLES == dict(EVAL.samples) and list(EVAL.samples) == list(BENCHMARKS)
    assert SETTING_GROUPS[EVAL.setting_group] == tuple(EVAL.settings)
    for name, (temperature, top_p) in EVAL.settings.items():
        assert (SETTINGS[name].temperature, SETTINGS[name].top_p) == (temperature, top_p)
        assert SETTINGS[name].samples is None  # k per benchmark: DEFAULT_SAMPLES
    args = build_parser().parse_args(["eval", "--model", "m", *eval_args()])
    assert (args.setting, args.max_new_tokens, args.samples) == (EVAL.setting_group, EVAL.max_new_tokens, None)


def test_the_eval_protocol_reads_the_papers_table_and_the_table_imports_nothing():
    """One fact, one place: stapo.eval.protocol takes k and the two sampling settings from
    stapo.paper_setup (no second copy to drift), and paper_setup imports nothing from stapo, so the
    import cannot run in a cycle."""
    import ast

    import stapo.eval.protocol as protocol
    import stapo.paper_setup as paper_setup

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imported(paper_setup) if m.split(".")[0] == "stapo"}
    assert "stapo.paper_setup" in imported(protocol)
    # no number of the table is written in protocol.py (1.0, T and top-p of "train", is greedy's top-p too)
    tree = ast.parse(Path(protocol.__file__).read_text(encoding="utf-8"))
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) in (int, float)}
    table = set(EVAL.samples.values()) | {v for setting in EVAL.settings.values() for v in setting} - {1.0}
    assert not literals & table, f"eval/protocol.py types {sorted(literals & table)} again"


def test_verl_readme_states_the_table():
    text = (REPO / "recipes" / "verl" / "README.md").read_text()
    eval_lines = [line for line in text.splitlines() if line.strip().startswith("stapo eval")]
    assert eval_lines and all(" ".join(eval_args()) in line for line in eval_lines)
    assert f"{TRAINING.max_response_length:,}" in text or str(TRAINING.max_response_length) in text
    for method in METHODS:
        assert f"| {method} |" in text
    for stale in ("tau_p 0.01", "| 8192 |", "| 16384 |"):
        assert stale not in text
    if _has_verl():
        from stapo.engines.verl.config import VERL_TAU_H_SCOPE

        scope = next(line for line in text.splitlines() if "**τ_h scope**" in line)
        assert "follows the paper" in scope and VERL_TAU_H_SCOPE == S2T_READINGS["paper"].tau_h_scope
        assert f"(`{VERL_TAU_H_SCOPE}`)" in text


# ------------------------------------------------------------------------------------------ the checks can fail


def _mutated(path: Path, tmp_path: Path, key: str, value) -> Path:
    raw = yaml.safe_load(path.read_text())
    raw[key] = value
    out = tmp_path / path.name  # the same name: method and size are read from it
    header = "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("#"))
    out.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return out


@pytest.mark.parametrize("key,value", [
    ("max_completion_length", 16384),  # the former per-model length
    ("warmup_steps", 10),  # TRL counts optimizer steps: 10 training steps are 40
    ("gradient_accumulation_steps", 8),  # a 32-prompt mini-batch
    ("steps_per_generation", 32),  # a 128-prompt rollout batch
    ("learning_rate", 2.0e-6),
    ("max_grad_norm", 0.5),
    ("temperature", 0.7),
    ("epsilon_high", 0.28),  # a preset's setting in the file
    ("vllm_importance_sampling_correction", True),  # TRL's default, not the paper's
])
def test_a_wrong_trl_value_is_caught(tmp_path, key, value):
    path = PAPER_DIR / "qwen3-8b-grpo.yaml"
    check_trl_config(path)  # the real one passes
    with pytest.raises(AssertionError):
        check_trl_config(_mutated(path, tmp_path, key, value))


@pytest.mark.parametrize("override", [
    "data.max_response_length=16384",
    "actor_rollout_ref.rollout.n=16",
    "actor_rollout_ref.actor.ppo_mini_batch_size=32",
    "actor_rollout_ref.actor.optim.lr_warmup_steps=40",
    "actor_rollout_ref.actor.optim.clip_grad=0.5",
    "actor_rollout_ref.actor.clip_ratio_high=0.2",
    "+actor_rollout_ref.actor.policy_loss.stapo.tau_h_max=0.6931471805599453",
    "+actor_rollout_ref.actor.policy_loss.stapo.tau_p=0.01",
    "actor_rollout_ref.rollout.val_kwargs.temperature=0.7",
])
def test_a_wrong_verl_value_is_caught(override, capsys):
    lines = printed_overrides("stapo", "1.7b", capsys)
    check_verl_overrides(lines, "stapo", "1.7b")  # the real one passes
    key = override.split("=", 1)[0]
    replaced = [override if line.split("=", 1)[0] == key else line for line in lines]
    assert replaced != lines, key
    with pytest.raises(AssertionError):
        check_verl_overrides(replaced, "stapo", "1.7b")
