"""The console of `stapo train`: one line per logging step, messages on their own lines, no progress bars
or cursor codes when the output is not a terminal, and s/step / ETA that count training only."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

SRC = Path(__file__).resolve().parents[2] / "src"


# ---- s/step and ETA: training steps only -------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_seconds_per_step_and_eta_leave_out_the_evaluations(monkeypatch, capsys):
    """Hand-worked: 100 s of evaluation before training, steps of 15 s, 50 s of evaluation after step 2."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from stapo.engines.trl import console

    clock = _Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    callback = console.ConsoleLineCallback()
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    state = TrainerState(max_steps=10)

    callback.on_train_begin(args, state, control)
    clock.now += 100.0  # the evaluation before training (HeldoutAccuracyCallback.on_train_begin)
    callback.on_log(args, state, control, logs={"eval_heldout_accuracy": 0.2, "eval_heldout_seconds": 100.0})
    for step, evaluation in ((1, 0.0), (2, 50.0)):
        callback.on_step_begin(args, state, control)
        clock.now += 15.0
        state.global_step = step
        if evaluation:  # an in-training evaluation at this step, logged before its training line
            clock.now += evaluation
            callback.on_log(args, state, control,
                            logs={"eval_heldout_accuracy": 0.5, "eval_heldout_seconds": evaluation})
        callback.on_log(args, state, control, logs={"loss": 0.1, "reward": 0.5})
    clock.now += 3.0  # saving
    state.global_step = 2
    callback.on_log(args, state, control, logs={"train_runtime": 183.0, "train_loss": 0.1})

    assert capsys.readouterr().out.splitlines() == [
        "step 1/10 | reward 0.500 | 15.0 s/step | ETA 2m15s",
        "step 2/10 | reward 0.500 | held-out 0.500 | 15.0 s/step | ETA 2m00s",
        "trained 2 steps in 3m03s (2m30s of it evaluation), mean loss 0.1",
    ]


def test_the_trainers_own_evaluation_is_left_out_too(monkeypatch, capsys):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from stapo.engines.trl import console

    clock = _Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    callback = console.ConsoleLineCallback()
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    state = TrainerState(max_steps=4)
    callback.on_train_begin(args, state, control)
    callback.on_step_begin(args, state, control)
    clock.now += 4.0 + 30.0
    state.global_step = 1
    callback.on_log(args, state, control, logs={"eval_loss": 0.3, "eval_runtime": 30.0})
    callback.on_log(args, state, control, logs={"loss": 0.1})
    assert capsys.readouterr().out.splitlines() == ["step 1/4 | 4.0 s/step | ETA 12s"]


# ---- a 2-step run, its output captured (not a terminal) -----------------------------------------------

# `stapo` whose evaluation before training takes 6 s more than it does (to see it left out of s/step),
# and whose S2T warns after one step that silenced nothing (the tiny model's S2T silences nothing).
SLOW_EVAL_STAPO = """
import sys, time
import stapo.train

evaluate = stapo.train.evaluate_accuracy

def slow_before(*args, **kwargs):
    result = evaluate(*args, **kwargs)
    if (args[6] if len(args) > 6 else kwargs.get("desc")) == "eval before":
        time.sleep(6)
        result["seconds"] += 6
    return result

stapo.train.evaluate_accuracy = slow_before
from stapo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def console_run(tiny_qwen3_dir, tmp_path_factory) -> subprocess.CompletedProcess:
    out = tmp_path_factory.mktemp("console") / "run"
    fields = dict(model=str(tiny_qwen3_dir), output_dir=str(out), max_steps=2, save_steps=1, seed=3,
                  max_completion_length=4, per_device_train_batch_size=4, num_generations=2,
                  train_data="synthetic:add1?n=16&seed=0", eval_data="synthetic:add1?n=2&split=heldout",
                  eval_samples=1, eval_limit=2, plots="false", inert_warning_steps=1, dataloader_num_workers=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SLOW_EVAL_STAPO, "train", "demo",
                           *[f"{k}={v}" for k, v in fields.items()]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_one_line_per_step_and_no_bars_or_cursor_codes_off_a_terminal(console_run):
    stdout, stderr = console_run.stdout, console_run.stderr
    for stream in (stdout, stderr):
        assert "\x1b" not in stream and "\r" not in stream  # no cursor movement, no redrawn bar
        assert "it/s]" not in stream and "sample/s]" not in stream and "Writing model shards" not in stream
    step_lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in step_lines] == ["step 1/2", "step 2/2"]
    assert all(" s/step" in line for line in step_lines)
    # every line is a step line or a whole message (none glued onto another)
    for line in stdout.splitlines():
        assert line.startswith(("step ", "stapo: ", "trained ", "held-out accuracy: ", "run directory: ")), line
        assert line.count("stapo: ") + len(re.findall(r"\bstep \d+/", line)) <= 1, line
    assert re.search(r"^stapo: before: accuracy \d\.\d{3} ± \d\.\d{3} \(evaluated in \d+\.\d s\)$", stdout, re.M)
    assert re.search(r"^trained 2 steps in \d+s \(\d+s of it evaluation\), mean loss ", stdout, re.M)


@pytest.mark.slow
def test_seconds_per_step_of_a_run_leave_out_its_evaluation_before_training(console_run):
    step_lines = [line for line in console_run.stdout.splitlines() if line.startswith("step ")]
    per_step = [float(re.search(r"\| (\d+\.\d) s/step", line).group(1)) for line in step_lines]
    assert all(s < 6.0 / 2 for s in per_step), step_lines  # with the 6 s evaluation counted, >= 3 s


@pytest.mark.slow
def test_a_long_warning_is_wrapped_on_lines_of_its_own(console_run):
    lines = console_run.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stapo: S2T has silenced no token"))
    warning = [lines[start], *itertools.takewhile(lambda line: line.startswith("    "), lines[start + 1:])]
    assert len(warning) > 1 and all(len(line) <= 100 for line in warning)
    assert "inert_warning_steps = 0 turns this warning off" in " ".join(line.strip() for line in warning)
