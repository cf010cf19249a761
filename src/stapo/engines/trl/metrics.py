"""Per-step metric bookkeeping for the TRL engine, and the `metrics.jsonl` writer.

`TokenStats` collects, for one optimizer step (one gradient-accumulation window), the *sums* of the
per-token quantities of every micro-batch on this process; `reduce_window` turns them into global
step metrics with one all-reduce, so fractions are token-weighted over the whole step and every
process (rank) logs the same numbers.
"""

from __future__ import annotations

import json
import math
import os
from typing import TextIO

import torch
from transformers import TrainerCallback

from stapo.rundir import METRICS_FILE, truncate_metrics_after_step

# Sums kept per window, in this order (one stacked tensor -> one all-reduce).
SUM_KEYS = (
    "valid",  # valid completion tokens
    "masked",  # S2T-silenced tokens (diagnostic for methods that do not apply S2T)
    "loss_tokens",  # tokens that receive gradient
    "low_prob",  # p < tau_p
    "candidates",  # p < tau_p and A > 0: what some tau_h could silence
    "low_entropy",  # H < entropy threshold
    "entropy",  # Σ H
    "clip_low",  # tokens with gradient and r < 1 - eps_low, A < 0
    "clip_high",  # tokens with gradient and r > 1 + eps_high, A > 0
    "ratio",  # Σ r over the tokens with gradient
    "threshold",  # Σ over micro-batches of the (already global) entropy threshold
    "micro_batches",
    "loss",  # Σ of the micro-batch losses returned to the Trainer (this process)
)


class TokenStats:
    """Running sums over the micro-batches of one optimizer step on this process."""

    def __init__(self, device: torch.device, deferred: bool):
        self.sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=device)
        self.ratio_min = torch.tensor(math.inf, dtype=torch.float64, device=device)
        self.ratio_max = torch.tensor(-math.inf, dtype=torch.float64, device=device)
        self.deferred = deferred  # the S2T denominator is corrected at the end of the window

    def add(self, **values) -> None:
        for key, value in values.items():
            self.sums[SUM_KEYS.index(key)] += torch.as_tensor(value, dtype=torch.float64, device=self.sums.device)

    def add_ratio_extremes(self, rmin: torch.Tensor, rmax: torch.Tensor) -> None:
        self.ratio_min = torch.minimum(self.ratio_min, rmin.double())
        self.ratio_max = torch.maximum(self.ratio_max, rmax.double())

    def get(self, key: str) -> float:
        return float(self.sums[SUM_KEYS.index(key)])


def reduce_window(stats: TokenStats, accelerator) -> dict[str, float]:
    """Global sums (all processes) of a window, plus the global ratio min / max."""
    sums = accelerator.reduce(stats.sums.clone(), reduction="sum")
    extremes = accelerator.gather(torch.stack([stats.ratio_min, -stats.ratio_max]).reshape(1, 2))
    extremes = extremes.reshape(-1, 2)
    out = {k: float(v) for k, v in zip(SUM_KEYS, sums.tolist())}
    out["ratio_min"] = float(extremes[:, 0].min())
    out["ratio_max"] = float(-extremes[:, 1].min())
    return out


def window_metrics(g: dict[str, float], s2t_applied: bool) -> dict[str, float]:
    """Step metrics (TRL's names where TRL logs the same quantity, `stapo/...` otherwise)."""
    n = max(g["valid"], 1.0)
    n_loss = max(g["loss_tokens"], 1.0)  # clip fractions and ratios: over the tokens that get gradient
    out = {
        "entropy": g["entropy"] / n,
        "clip_ratio/low_mean": g["clip_low"] / n_loss,
        "clip_ratio/high_mean": g["clip_high"] / n_loss,
        "clip_ratio/region_mean": (g["clip_low"] + g["clip_high"]) / n_loss,
        "stapo/ratio_mean": g["ratio"] / n_loss,
        "stapo/ratio_min": g["ratio_min"] if math.isfinite(g["ratio_min"]) else 1.0,
        "stapo/ratio_max": g["ratio_max"] if math.isfinite(g["ratio_max"]) else 1.0,
        "stapo/completion_tokens": g["valid"],
        "stapo/loss_tokens": g["loss_tokens"],
        "stapo/s2t_masked_count": g["masked"],
        "stapo/s2t_masked_frac": g["masked"] / n,
        "stapo/frac_low_prob": g["low_prob"] / n,
        "stapo/s2t_low_prob": g["low_prob"],
        "stapo/s2t_candidates": g["candidates"],
        "stapo/frac_low_entropy": g["low_entropy"] / n,
        "stapo/entropy_threshold": g["threshold"] / max(g["micro_batches"], 1.0),
        "stapo/s2t_applied": 1.0 if s2t_applied else 0.0,
    }
    return out


class MetricsJsonlCallback(TrainerCallback):
    """Appends one JSON line per logging step to `<output_dir>/metrics.jsonl` (main process only).

    Each line is `{"step": global_step, "kind": kind, **logs}` with kind "train" (one line per logged
    training step), "eval" (evaluation logs) or "summary" (the Trainer's end-of-training totals);
    lines are flushed as they are written. On resume
    from a checkpoint at step k, lines with step > k (written after that checkpoint by the run that
    is being resumed) are dropped first, so the file never holds a step twice.
    """

    def __init__(self, filename: str = METRICS_FILE):
        self.filename = filename
        self._file: TextIO | None = None

    def _path(self, args) -> str:
        return os.path.join(args.output_dir, self.filename)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        path = self._path(args)
        if os.path.exists(path):
            truncate_metrics_after_step(path, state.global_step)
        self._file = open(path, "a", encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._file is None or not logs:
            return
        if "train_runtime" in logs:
            kind = "summary"
        elif any(key.startswith("eval_") for key in logs):
            kind = "eval"
        else:
            kind = "train"
        record = {"step": state.global_step, "kind": kind}
        for key, value in logs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # strict JSON has no NaN / inf
            record[key] = value
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._file is not None:
            self._file.close()
            self._file = None
