"""One readable console line per logging step, in place of the Trainer's printed dict of ~45 numbers.

    step 3/40 | reward 0.438 | held-out 0.450 | entropy 0.812 | S2T masked 2 (0.39%) | clip low 0.0% high 0.3%
      | 1.2k tok/s | 4.1 s/step | ETA 2m32s

The full record of every step stays in metrics.jsonl and the report_to loggers; only the console is
shortened. Held-out accuracy is printed on the line of the step it was measured at (the in-training
evaluation logs it just before that step's training line). `install_console(trainer)` swaps the
Trainer's ProgressCallback (or PrinterCallback, with disable_tqdm) for `ConsoleLineCallback`.
"""

from __future__ import annotations

import math
import time

from transformers import PrinterCallback, ProgressCallback

__all__ = ["ConsoleLineCallback", "format_step_line", "install_console"]


def _num(logs: dict, key: str) -> float | None:
    value = logs.get(key)
    if hasattr(value, "item"):
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


class ConsoleLineCallback(ProgressCallback):
    """The Trainer's progress bar, with `format_step_line` instead of the printed dict (main process only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._heldout: tuple[int, float] | None = None  # (step, accuracy) of the last held-out evaluation
        self._start: tuple[float, int] | None = None  # (time, step) when this process began training

    def _write(self, line: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._start = (time.time(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:  # the Trainer's end-of-training totals
            loss = _num(logs, "train_loss")
            runtime = _num(logs, "train_runtime") or 0.0
            self._write(f"trained {state.global_step} steps in {_duration(runtime)}"
                        + (f", mean loss {loss:.4g}" if loss is not None else ""))
            return
        accuracy = _num(logs, "eval_heldout_accuracy")
        if accuracy is not None:
            self._heldout = (state.global_step, accuracy)
            return
        if any(key.startswith("eval_") for key in logs):
            return  # other evaluation logs: metrics.jsonl and the loggers have them
        heldout = self._heldout[1] if self._heldout and self._heldout[0] == state.global_step else None
        per_step = None
        if self._start is not None and state.global_step > self._start[1]:
            per_step = (time.time() - self._start[0]) / (state.global_step - self._start[1])
        self._write(format_step_line(logs, state.global_step, state.max_steps, heldout, per_step))


def install_console(trainer) -> None:
    """Replace the Trainer's console printer (ProgressCallback or PrinterCallback) with the one-line one."""
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    had_printer = trainer.pop_callback(PrinterCallback) is not None
    if had_bar or had_printer:
        trainer.add_callback(ConsoleLineCallback() if had_bar else _PlainConsoleLineCallback())


class _PlainConsoleLineCallback(ConsoleLineCallback):
    """disable_tqdm=True: the same lines, printed, with no progress bar."""

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = (time.time(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass

    def on_evaluate(self, args, state, control, **kwargs):
        pass

    def on_predict(self, args, state, control, **kwargs):
        pass

    def on_train_end(self, args, state, control, **kwargs):
        pass
