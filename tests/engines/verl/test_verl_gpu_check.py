"""scripts/gpu_check_verl.sh (the GPU smoke run of the verl recipe) as far as a CPU machine goes: it is
valid bash, its --dry-run prepares the data and prints a launch command whose overrides verl's own Hydra
schema and config validation accept (the tiny run the GPU executes); and every command docs/verl.md names
exists and parses."""

from __future__ import annotations

import pytest
from verl_fakes import VERL_MODULE, VERL_SKIP_REASON

pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import verl

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "gpu_check_verl.sh"
VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def _env():
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def test_the_script_is_valid_bash_and_refuses_unknown_modes(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    bad = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--gpu"], capture_output=True, text=True, env=_env())
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.slow  # 14-22 s: three Python start-ups (data, recipe, run.sh) on two CPU cores
def test_dry_run_prints_a_tiny_recipe_run_that_verl_accepts(tmp_path):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from stapo.engines.verl.config import StapoPolicyLossConfig
    from stapo.engines.verl.main import apply_stapo_defaults

    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True, env=_env(),
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = (out / "command.txt").read_text().splitlines()
    assert lines[0].endswith("-m stapo.engines.verl.main")
    overrides = lines[1:]
    cfg = apply_stapo_defaults(compose(overrides))  # later overrides win, as on the command line
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert cfg.trainer.total_training_steps == 2 and cfg.trainer.n_gpus_per_node == 1 and cfg.trainer.nnodes == 1
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n, actor.ppo_mini_batch_size) == (8, 4, 4)
    assert actor.ppo_max_token_len_per_gpu == 1024 and actor.use_dynamic_bsz  # several micro-batches: the pre-pass
    assert cfg.trainer.test_freq == -1 and cfg.trainer.val_before_train is False
    assert isinstance(actor.policy_loss, StapoPolicyLossConfig) and actor.policy_loss.loss_mode == "stapo"
    assert actor.policy_loss.stapo.tau_h_scope == "mini_batch" and actor.calculate_entropy
    train = out / "data" / "train.parquet"
    assert cfg.data.train_files == str(train) and cfg.data.val_files == str(train)
    import pyarrow.parquet as pq

    assert pq.read_table(train).num_rows == 64


def _doc_commands():
    """The command lines of docs/verl.md: code-block lines and inline code spans that run something."""
    text = (REPO / "docs" / "verl.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    for line in lines:
        words = shlex.split(line, comments=True) if line else []
        while words and re.match(r"^[A-Z_]+=", words[0]):  # leading environment assignments
            words = words[1:]
        if words[:1] in (["python"], ["bash"]):
            yield line, words


def test_every_command_docs_verl_names_exists(capsys):
    """`python -m` modules exist (stapo's answer --help; the launch line's overrides compose and validate under
    verl's schema), `python -c` snippets run, scripts exist and are valid bash, test paths exist."""
    import importlib
    import importlib.util

    from stapo.engines.verl.main import apply_stapo_defaults

    kinds = set()
    for line, words in _doc_commands():
        if words[0] == "bash":
            assert (REPO / words[1]).is_file(), line
            subprocess.run(["bash", "-n", str(REPO / words[1])], check=True)
            kinds.add(words[1])
        elif words[1] == "-c":
            exec(compile(words[2], line, "exec"), {})
            kinds.add("-c")
        elif words[1] == "-m" and words[2] == "pytest":
            targets = [w for w in words[3:] if not w.startswith("-")]
            assert targets and all((REPO / t.split("::")[0]).exists() for t in targets), line
            kinds.add("pytest")
        elif words[1] == "-m":
            module = words[2]
            assert importlib.util.find_spec(module) is not None, line
            overrides = [w for w in words[3:] if "=" in w and "<" not in w]
            if module == "stapo.engines.verl.main" and overrides:
                cfg = apply_stapo_defaults(compose(overrides))
                assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "stapo", line
            elif module.startswith("stapo."):
                with pytest.raises(SystemExit) as done:
                    importlib.import_module(module).main(["--help"])
                assert done.value.code == 0, line
                shown = capsys.readouterr().out
                assert all(flag in shown for flag in words[3:] if flag.startswith("--")), line
            kinds.add(module)
        else:
            raise AssertionError(f"docs/verl.md: {line!r}: not a command this test knows")
    assert {"stapo.engines.verl.main", "stapo.engines.verl.data", "stapo.engines.verl.recipe", "pytest",
            "scripts/gpu_check_verl.sh", "-c"} <= kinds, kinds
