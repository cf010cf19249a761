"""Non-finite steps for the TRL engine (the run directory's checkpoints and resume hygiene are in
`stapo.rundir`).

Non-finite steps. `NonFiniteGuard` counts optimizer steps whose loss or gradient norm is NaN/inf.
Such a step is skipped (the gradients are dropped, so the optimizer leaves every parameter and its
moments untouched) and no checkpoint is written for it; after `max_nonfinite_steps` skipped steps in
a row the run stops with `NonFiniteTrainingError`, leaving the last checkpoint of a finite step as
the newest one on disk.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "stapo_state.json"  # the guard's counters, inside each checkpoint


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


# ---- non-finite steps -------------------------------------------------------------------------------


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps with a non-finite loss or gradient norm.

    `check(loss, grad_norm)` returns True when the step is finite (take it) and False when it must be
    skipped; it raises `NonFiniteTrainingError` on the `limit`-th skipped step in a row.
    """

    limit: int = 3
    total: int = 0  # skipped steps over the whole run (resumed runs included)
    consecutive: int = 0  # skipped steps since the last finite one

    def check(self, loss: float, grad_norm: float, step: int, forward_positions: int = 0) -> bool:
        """`forward_positions`: valid positions whose forward (log-prob, entropy) was NaN/inf this step."""
        if math.isfinite(loss) and math.isfinite(grad_norm) and not forward_positions:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {self.consecutive} consecutive step(s) had a non-finite "
                f"forward, loss or gradient (loss={loss}, grad_norm={grad_norm}, non-finite forward positions="
                f"{forward_positions}; max_nonfinite_steps={self.limit}); "
                "the newest checkpoint is from the last finite step — lower the learning rate or check "
                "the data and rewards, then resume"
            )
        return False

    def save(self, checkpoint_dir: str | os.PathLike) -> None:
        state = {"nonfinite_total": self.total, "nonfinite_consecutive": self.consecutive}
        Path(checkpoint_dir, STATE_FILE).write_text(json.dumps(state), encoding="utf-8")

    def load(self, checkpoint_dir: str | os.PathLike | None) -> None:
        if checkpoint_dir is None:
            return
        try:
            state = json.loads(Path(checkpoint_dir, STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a checkpoint from before the guard existed
            return
        self.total = int(state.get("nonfinite_total", 0))
        self.consecutive = int(state.get("nonfinite_consecutive", 0))

    def as_dict(self) -> dict:
        return asdict(self)
