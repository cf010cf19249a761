"""The training curves stapo draws and tabulates: one vocabulary for the PNG figures, the HTML reports
and the printed tables (`stapo analyze runs`, `stapo demo --compare`, a run's plots/curves.png).

Each curve has a title, the y-axis label (with its unit), the unit a table row names, the factor from
the logged value to the shown one (fractions are shown in percent), the range its values can take, and
the metric keys engines log it under, in order of preference (TRL: `reward`, `completions/mean_length`;
verl: `critic/score/mean`, `response_length/mean`): the first key present in a run wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    title: str  # the panel title and the table row
    axis: str  # the y-axis label, with the unit
    unit: str  # the unit a table row names ("" when the title says it)
    keys: tuple[str, ...]  # the metric names engines log it under, in order of preference
    scale: float = 1.0  # shown value = logged value x scale (100: a fraction shown in percent)
    lower: float | None = 0.0  # the smallest value it can take (shown units; None: unbounded)
    upper: float | None = None  # the largest (shown units)
    decimals: int | None = None  # shown with this many decimals (None: 3 significant digits)

    @property
    def label(self) -> str:
        """The title with its unit: a table row's name."""
        return f"{self.title} ({self.unit})" if self.unit else self.title

    def shown(self, value: float) -> float:
        return float(value) * self.scale

    def fmt(self, value: float | None, digits: int = 3) -> str:
        """The logged `value` in shown units, `digits` significant digits ("—" for none)."""
        if value is None or not math.isfinite(value):
            return "—"
        v = self.shown(value)
        if self.decimals is not None:
            return f"{v:.{self.decimals}f}"
        return "0" if v == 0 else f"{v:.{digits}g}"


HELDOUT = "heldout_accuracy"
TRAIN_ACCURACY = "accuracy"
REWARD = "reward"
S2T_MASKED = "s2t_masked_frac"
HELDOUT_STDERR_KEYS = ("eval_heldout_stderr",)  # logged beside eval_heldout_accuracy

CURVES: dict[str, Curve] = {
    HELDOUT: Curve("held-out accuracy", "accuracy (%)", "%",
                   ("eval_heldout_accuracy", "val/accuracy", "eval_accuracy"), scale=100.0, upper=100.0,
                   decimals=1),
    REWARD: Curve("training reward", "mean reward per completion", "",
                  ("reward", "rewards/mean", "critic/score/mean", "reward_mean"), lower=None),
    TRAIN_ACCURACY: Curve("training accuracy", "completions with reward > 0 (%)", "%",
                          ("stapo/accuracy", "accuracy", "train_accuracy"), scale=100.0, upper=100.0),
    "entropy": Curve("entropy of the sampled tokens", "entropy (nats)", "nats",
                     ("entropy", "stapo/entropy_mean", "actor/entropy", "policy/entropy")),
    S2T_MASKED: Curve("tokens silenced by S2T", "% of completion tokens", "% of tokens",
                      ("stapo/s2t_masked_frac", "s2t_masked_frac", "actor/s2t_masked_frac"),
                      scale=100.0, upper=100.0),
    "clip_low": Curve("clipped low (A < 0)", "% of tokens with ratio < 1 − ε", "% of tokens",
                      ("clip_ratio/low_mean", "actor/pg_clipfrac_lower", "clip_ratio/low"), scale=100.0,
                      upper=100.0),
    "clip_high": Curve("clipped high (A > 0)", "% of tokens with ratio > 1 + ε_high", "% of tokens",
                       ("clip_ratio/high_mean", "actor/pg_clipfrac", "clip_ratio/high"), scale=100.0,
                       upper=100.0),
    "response_length": Curve("response length", "tokens per completion", "tokens",
                             ("completions/mean_length", "response_length/mean", "response_length")),
}


def s2t_title(applied: set[bool | None]) -> str:
    """The S2T panel's title for runs that apply S2T (True), only measure it (False) or are unknown (None)."""
    if applied == {True}:
        return "tokens silenced by S2T"
    if applied == {False}:
        return "tokens S2T would silence (measured, not applied)"
    return "tokens silenced by S2T (stapo) or that it would silence (the other methods: measured only)"


def heldout_size_text(problems: int | None, samples: int | None) -> str:
    """"avg@8 over 20 problems" (what is known of it; "" when nothing is)."""
    parts = []
    if samples:
        parts.append(f"avg@{samples}")
    if problems:
        parts.append(f"{problems} problems")
    return " over ".join(parts)
