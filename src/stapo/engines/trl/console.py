"""The console of a training run: one line per logging step, messages on their own lines, no progress bar.

    step 3/40 | reward 0.438 | held-out 0.450 | entropy 0.812 | S2T masked 2 (0.39%) | clip low 0.0% high 0.3%
      | 1.2k tok/s | 4.1 s/step | ETA 2m32s

In place of the Trainer's progress bar and printed dict of ~45 numbers (`install_console(trainer)` swaps
its ProgressCallback or PrinterCallback for `ConsoleLineCallback`): a redrawn bar puts carriage returns
and cursor codes into a log file, and any message printed meanwhile lands at the end of the bar. The
full record of every step stays in metrics.jsonl and the report_to loggers; only the console is
shortened.

Held-out accuracy is printed on the line of the step it was measured at (the in-training evaluation
logs it just before that step's training line). s/step and the ETA count training only: the clock
starts at the first training step (after the evaluation before training), and the time of every
evaluation logged since (`eval_heldout_seconds`, the Trainer's `eval_runtime`) is taken out; the
end-of-training line says how much of the run was evaluation.

`quiet_console()` is the rest of a clean console for a whole run: no transformers / huggingface_hub
progress bars (a checkpoint's "Writing model shards" bar, drawn twice in a log file), and stapo's
warnings wrapped into lines of readable width.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import textwrap
import time

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

__all__ = ["ConsoleLineCallback", "EVAL_SECONDS_KEYS", "format_step_line", "install_console", "quiet_console"]

# Log keys holding the seconds an evaluation took: stapo's held-out accuracy, the Trainer's evaluate().
EVAL_SECONDS_KEYS = ("eval_heldout_seconds", "eval_runtime")


def _num(logs: dict, key: str) -> float | None:
    value = logs.get(key)
    if value is not None and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def format_step_line(logs: dict, step: int, max_steps: int, heldout: float | None = None,
                     seconds_per_step: float | None = None) -> str:
    """One line for a training log: the quantities to watch, the ones that are present."""
    parts = [f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"]
    reward = _num(logs, "reward")
    if reward is not None:
        parts.append(f"reward {reward:.3f}")
    if heldout is not None:
        parts.append(f"held-out {heldout:.3f}")
    entropy = _num(logs, "entropy")
    if entropy is not None:
        parts.append(f"entropy {entropy:.3f}")
    masked, frac = _num(logs, "stapo/s2t_masked_count"), _num(logs, "stapo/s2t_masked_frac")
    if masked is not None and frac is not None:
        # methods other than stapo measure what S2T would silence without applying it
        label = "S2T masked" if _num(logs, "stapo/s2t_applied") != 0.0 else "S2T (measured)"
        parts.append(f"{label} {masked:.0f} ({100 * frac:.2f}%)")
    low, high = _num(logs, "clip_ratio/low_mean"), _num(logs, "clip_ratio/high_mean")
    if low is not None and high is not None:
        parts.append(f"clip low {100 * low:.1f}% high {100 * high:.1f}%")
    tokens_per_s = _num(logs, "stapo/tokens_per_s")
    if tokens_per_s is not None:
        parts.append(f"{_rate(tokens_per_s)} tok/s")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.1f} s/step")
        if max_steps and max_steps > step:
            parts.append(f"ETA {_duration(seconds_per_step * (max_steps - step))}")
    return " | ".join(parts)


class ConsoleLineCallback(TrainerCallback):
    """`format_step_line` for every training log, printed on its own line (main process only)."""

    def __init__(self):
        self._heldout: tuple[int, float] | None = None  # (step, accuracy) of the last held-out evaluation
        self._clock: tuple[float, int] | None = None  # (monotonic time, step) at this process's first step
        self._eval_since_clock = 0.0  # seconds of evaluation logged since the clock started
        self._eval_total = 0.0  # seconds of evaluation logged in this train() call

    def on_train_begin(self, args, state, control, **kwargs):
        self._clock, self._eval_since_clock, self._eval_total = None, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self._clock is None:  # after anything done at train begin (the evaluation before training)
            self._clock = (time.monotonic(), state.global_step)

    def seconds_per_step(self, step: int) -> float | None:
        """Training seconds per optimizer step since this process's first step (evaluations taken out)."""
        if self._clock is None or step <= self._clock[1]:
            return None
        return max(time.monotonic() - self._clock[0] - self._eval_since_clock, 0.0) / (step - self._clock[1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:  # the Trainer's end-of-training totals
            loss = _num(logs, "train_loss")
            runtime = _num(logs, "train_runtime") or 0.0
            evaluation = f" ({_duration(self._eval_total)} of it evaluation)" if self._eval_total >= 0.5 else ""
            print(f"trained {state.global_step} steps in {_duration(runtime)}{evaluation}"
                  + (f", mean loss {loss:.4g}" if loss is not None else ""), flush=True)
            return
        if any(key.startswith("eval_") for key in logs):  # the rest of evaluation logs: metrics.jsonl, loggers
            seconds = sum(_num(logs, key) or 0.0 for key in EVAL_SECONDS_KEYS)
            self._eval_total += seconds
            if self._clock is not None:
                self._eval_since_clock += seconds
            accuracy = _num(logs, "eval_heldout_accuracy")
            if accuracy is not None:
                self._heldout = (state.global_step, accuracy)
            return
        heldout = self._heldout[1] if self._heldout and self._heldout[0] == state.global_step else None
        print(format_step_line(logs, state.global_step, state.max_steps, heldout,
                               self.seconds_per_step(state.global_step)), flush=True)


def install_console(trainer) -> None:
    """Replace the Trainer's console printer (ProgressCallback or PrinterCallback) with the one-line one."""
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    had_printer = trainer.pop_callback(PrinterCallback) is not None
    if had_bar or had_printer:
        trainer.add_callback(ConsoleLineCallback())


class _WrappedLines(logging.Formatter):
    """A warning of several sentences as lines of the terminal's width (100 columns off a terminal),
    continued with an indent."""

    def format(self, record):
        stream = sys.stderr
        width = shutil.get_terminal_size((100, 24)).columns if stream.isatty() else 100
        return "\n".join(
            textwrap.fill(line, width=max(width - 1, 40), subsequent_indent="    ", break_long_words=False,
                          break_on_hyphens=False)
            for line in super().format(record).splitlines()
        )


@contextlib.contextmanager
def quiet_console():
    """For one training run: transformers' (and huggingface_hub's) progress bars off, and stapo's warnings
    printed wrapped on stderr where nothing else would print them (no handler configured: Python's
    last-resort handler would print them as one long line). Both restored on exit."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    stapo_logger = logging.getLogger("stapo")
    handler = None
    if not stapo_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(_WrappedLines("%(message)s"))
        stapo_logger.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            stapo_logger.removeHandler(handler)
        if bars_were_on:
            hf_logging.enable_progress_bar()
