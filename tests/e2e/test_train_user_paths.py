"""`stapo train` as the README and docs promise it: missing logger / vLLM / peft packages are one error
before any model loads, notes for options without effect, LoRA, the model card, the console line,
held-out accuracy in metrics.jsonl / TensorBoard / curves.png, the world size, two CPU processes."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_demo_args import tiny_demo_args

import stapo.config as config_module
from stapo.cli import main

REPO = Path(__file__).resolve().parents[2]


def _hide_packages(monkeypatch, *names):
    real = config_module.importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in names else real(name, *a, **k))


# ------------------------------------------------------------------ packages, before any model load


@pytest.mark.parametrize("override, hidden, needles", [
    ("report_to=[tensorboard]", ("tensorboard", "tensorboardX"), ("report_to", 'pip install "stapo[logging]"')),
    ("report_to=wandb", ("wandb",), ("report_to", "'wandb'", 'pip install "stapo[logging]"')),
    ("use_vllm=true", ("vllm",), ("use_vllm", "scripts/setup.sh vllm", "vLLM on a CPU")),
    ("use_peft=true", ("peft",), ("use_peft", 'pip install "stapo[peft]"')),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_package_is_one_error_before_the_model_loads(monkeypatch, tmp_path, capsys, override, hidden,
                                                            needles, dry_run):
    _hide_packages(monkeypatch, *hidden)
    import stapo.models

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(stapo.models, "resolve_model", no_model)
    rc = main(["train", "demo", override, f"output_dir={tmp_path / 'run'}", *(["--dry-run"] if dry_run else [])])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    problem_lines = [line for line in err.splitlines() if line.strip().startswith("- ")]
    assert len(problem_lines) == 1, err
    for needle in needles:
        assert needle in problem_lines[0], (needle, err)
    assert not (tmp_path / "run").exists()


def test_installed_logger_passes(capsys):
    pytest.importorskip("tensorboard")
    assert main(["train", "paper/qwen3-1.7b-stapo", "use_vllm=false", "--dry-run"]) == 0
    assert "report_to:\n- tensorboard" in capsys.readouterr().out


# ------------------------------------------------------------------ notes for options without effect


def test_s2t_threshold_with_a_method_without_s2t_is_noted(capsys):
    assert main(["train", "demo", "method=grpo", "tau_p=0.02", "--dry-run"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("stapo: note:")]
    assert notes == ["stapo: note: tau_p applies only to method=stapo; here (method=grpo) S2T is only "
                     "measured (the stapo/s2t_* metrics), not applied"]
    assert main(["train", "demo", "method=grpo", "tau_p=0.02", "tau_h=0.3", "--dry-run"]) == 0
    assert "note: tau_p, tau_h apply only to method=stapo" in capsys.readouterr().err
    assert main(["train", "demo", "method=stapo", "tau_p=0.02", "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_lora_fields_without_use_peft_are_noted_and_unknown_no_more(capsys):
    assert main(["train", "demo", "lora_r=8", "--dry-run"]) == 0
    assert "lora_r applies only with use_peft=true" in capsys.readouterr().err
    assert main(["train", "demo", "use_peft=true", "lora_r=8", "lora_target_modules=[q_proj,v_proj]",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "use_peft: true" in out and "lora_r: 8" in out and "- q_proj" in out
    assert main(["train", "demo", "lora_r=0", "--dry-run"]) == 2
    assert "lora_r: (the LoRA rank) must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------ console line


def test_console_line_hand_worked():
    from stapo.engines.trl.console import format_step_line

    logs = {"loss": 0.01, "reward": 0.4375, "entropy": 0.8123, "stapo/s2t_masked_count": 2.0,
            "stapo/s2t_masked_frac": 0.0039, "stapo/s2t_applied": 1.0, "clip_ratio/low_mean": 0.0,
            "clip_ratio/high_mean": 0.003, "stapo/tokens_per_s": 1234.0, "completions/mean_length": 9.0}
    line = format_step_line(logs, 3, 40, heldout=0.45, seconds_per_step=4.0)
    assert line == ("step 3/40 | reward 0.438 | held-out 0.450 | entropy 0.812 | S2T masked 2 (0.39%) | "
                    "clip low 0.0% high 0.3% | 1.2k tok/s | 4.0 s/step | ETA 2m28s")
    measured = format_step_line({**logs, "stapo/s2t_applied": 0.0}, 40, 40)
    assert "S2T (measured) 2" in measured and "ETA" not in measured and "held-out" not in measured


# ------------------------------------------------------------------ one run: card, console, held-out


@pytest.fixture(scope="module")
def evaluated_run(tiny_qwen3_dir, tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("run") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["train", "demo", *tiny_demo_args(tiny_qwen3_dir, out, max_steps=2, save_steps=2),
                   "report_to=[tensorboard]"])
    assert rc == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_console_prints_one_line_per_step_and_the_world_size(evaluated_run):
    out, printed = evaluated_run
    assert "stapo: 1 process (world size 1), device cpu" in printed
    assert "{'loss'" not in printed and "'reward':" not in printed  # no Trainer dict
    step_lines = [seg for line in printed.splitlines() for seg in [line[line.find("step "):]]
                  if seg.startswith("step ") and " | reward " in seg]
    assert [s.split(" | ")[0] for s in step_lines] == ["step 1/2", "step 2/2"]
    assert "held-out" not in step_lines[0] and " | held-out 0." in step_lines[1]  # after = measured at step 2
    for part in ("entropy ", "S2T masked ", "clip low ", " tok/s", " s/step"):
        assert part in step_lines[1], part


@pytest.mark.slow
def test_heldout_accuracy_in_metrics_tensorboard_and_curves(evaluated_run):
    out, _ = evaluated_run
    ev = json.loads((out / "eval.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    heldout = [(x["step"], x["eval_heldout_accuracy"]) for x in lines if "eval_heldout_accuracy" in x]
    assert heldout == [(0, ev["before"]["accuracy"]), (2, ev["after"]["accuracy"])]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/heldout_accuracy")] == [
        (0, pytest.approx(ev["before"]["accuracy"])), (2, pytest.approx(ev["after"]["accuracy"]))]
    from stapo.analyze.runs import curve_panels, load_runs

    panels = curve_panels(load_runs([out]))
    assert panels["heldout_accuracy"][out.name][0].tolist() == [0, 2]
    assert (out / "plots" / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_model_card_states_the_run(evaluated_run, tiny_qwen3_dir):
    out, _ = evaluated_run
    ev = json.loads((out / "eval.json").read_text())
    for card in (out / "README.md", out / "final" / "README.md"):
        text = card.read_text()
        assert "None" not in text and "trained with GRPO" not in text
        assert f"**Base model:** `{tiny_qwen3_dir}` (a local directory)" in text
        assert "**Method:** `stapo`: STAPO:" in text
        assert ("S2T thresholds (applied):** tokens with A > 0, p < tau_p = 0.002 and H below tau_h = the 0.75 "
                "quantile of the candidates tokens' entropies are silenced") in text
        assert "**Training data:** `synthetic:add1?n=16&seed=0`" in text
        assert "**Steps:** 2 of 2" in text
        assert f"| before training | {ev['before']['accuracy']:.3f} ± {ev['before']['stderr']:.3f} | 2 | 1 |" in text
        assert f"| after training | {ev['after']['accuracy']:.3f} ± {ev['after']['stderr']:.3f} | 2 | 1 |" in text


def test_model_card_embedded_base_and_measured_only_s2t():
    from stapo.engines.trl.model_card import render_model_card

    facts = {"base_model": "embedded", "method": "grpo", "s2t_applied": False,
             "s2t": {"tau_p": 0.02, "tau_h": None, "tau_h_quantile": 0.05, "tau_h_population": "valid"},
             "options": {"learning_rate": 1e-6}, "train_data": "benchmark:math", "eval_data": None,
             "global_step": 3, "max_steps": 10, "eval": {}, "lora": None}
    text = render_model_card(facts)
    assert text.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "S2T thresholds (measured only, not applied):** tau_p = 0.02, tau_h = the 0.05 quantile" in text
    assert "**Steps:** 3 of 10" in text and "Not measured during training" in text


# ------------------------------------------------------------------ LoRA


@pytest.mark.slow
def test_lora_step_trains_only_the_adapter_with_finite_s2t_metrics(tiny_qwen3_dir, tmp_path):
    """One STAPO step with use_peft on the tiny Qwen3 (the embedded model takes minutes on a shared CPU)."""
    pytest.importorskip("peft")
    import datasets
    import torch

    from stapo.config import load_config
    from stapo.engines.trl import STAPOTrainer
    from stapo.train import build_stapo_config, lora_config

    run = load_config("demo", tiny_demo_args(tiny_qwen3_dir, tmp_path / "run", use_peft=True, lora_r=4, lora_alpha=8,
                                    lora_dropout=0.0, learning_rate=1e-2, save_steps=10))
    args = build_stapo_config(run)
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    def parity_reward(completions, **kwargs):  # the random model never answers right: a reward that varies
        return [float(sum(map(ord, str(c))) % 2) for c in completions]

    trainer = STAPOTrainer(model=str(tiny_qwen3_dir), reward_funcs=[parity_reward], args=args,
                           train_dataset=datasets.Dataset.from_list(rows), peft_config=lora_config(run))
    assert trainer.use_stapo_lm_head  # stapo's head in TRL's slot works under the PEFT wrapper
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable, changed - trainable
    assert any("lora_B" in n for n in changed)  # B starts at 0: the update went through the adapter
    log = next(e for e in trainer.state.log_history if "stapo/s2t_masked_frac" in e)
    for key in ("stapo/s2t_masked_frac", "stapo/s2t_candidates", "entropy"):
        assert math.isfinite(log[key]), key
    assert log["entropy"] > 0 and log["reward_std"] > 0


# ------------------------------------------------------------------ two CPU processes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_cpu_processes_print_the_world_size_once(tiny_qwen3_dir, tmp_path):
    """The multi-process invocation of docs/training.md, with 2 CPU processes (gloo)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "stapo", "train", "demo", *tiny_demo_args(tiny_qwen3_dir, out, eval_data="null", max_steps=1)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stapo: 2 processes (world size 2), device cpu") == 1, proc.stdout
    assert proc.stdout.count("run directory:") == 1 and proc.stdout.count("stapo: method=") == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1]
