"""Training-state reliability for the TRL engine: atomic checkpoints, resume hygiene, non-finite steps.

Atomic checkpoints. The Hugging Face Trainer writes `checkpoint-N/` in place, file by file; a crash
in the middle leaves a directory that looks like a checkpoint. `STAPOTrainer` instead lets the
Trainer write into a staging directory and publishes it with one rename:

    <output_dir>/.tmp-checkpoint-N/checkpoint-N/    written by the Trainer (weights, optimizer, RNG, state)
    <output_dir>/checkpoint-N/                      os.replace of the above once every file is fsync'ed

Nothing named `checkpoint-*` exists until it is complete, so neither `stapo train --resume` nor the
Trainer's own checkpoint rotation ever sees a half-written one. Leftover staging directories (a
crash while saving) are deleted at the next save.

Resume hygiene. Everything a run appends per step (metrics.jsonl lines, rollout captures) that is
newer than the checkpoint being resumed from was produced by steps that will run again; it is
dropped at the start of the resumed run, so no step appears twice and none is missing.

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
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint"
STAGING_PREFIX = ".tmp-"
STATE_FILE = "stapo_state.json"  # the guard's counters, inside each checkpoint
_ROLLOUT_FILE = re.compile(r"^step_(\d+)\.parquet$")


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


# ---- atomic checkpoints ---------------------------------------------------------------------------


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The directory the Trainer writes checkpoint `step` into (it creates `checkpoint-<step>` inside)."""
    return Path(run_dir) / f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}-{step}"


def remove_stale_staging(run_dir: str | os.PathLike) -> list[Path]:
    """Delete staging directories left by a crash while saving; returns what was removed."""
    removed = []
    for p in Path(run_dir).glob(f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file (and directory entry) under `root` to disk, so the rename publishes data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath), directory=True)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a complete checkpoint from its staging place to `final` with one rename.

    An existing `final` (the same step saved again, e.g. after resuming from an older checkpoint)
    is first renamed out of the way, then deleted once the new one is in place.
    """
    fsync_tree(staged)
    old = None
    if final.exists():
        old = final.parent / f"{STAGING_PREFIX}old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_path(final.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` in `run_dir` (a directory holding trainer_state.json)."""
    best, best_step = None, -1
    for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}-*"):
        suffix = p.name[len(CHECKPOINT_PREFIX) + 1 :]
        if suffix.isdigit() and p.is_dir() and (p / "trainer_state.json").is_file() and int(suffix) > best_step:
            best, best_step = p, int(suffix)
    return best


# ---- resume hygiene ---------------------------------------------------------------------------------


def truncate_rollouts_after_step(run_dir: str | os.PathLike, step: int, subdir: str = "rollouts") -> list[Path]:
    """Delete rollout captures of steps > `step` (written by a run that is being resumed)."""
    removed = []
    directory = Path(run_dir) / subdir
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _ROLLOUT_FILE.match(p.name)
        if m and int(m.group(1)) > step:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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

    def check(self, loss: float, grad_norm: float, step: int) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {self.consecutive} consecutive step(s) had a non-finite "
                f"loss or gradient (loss={loss}, grad_norm={grad_norm}; max_nonfinite_steps={self.limit}); "
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
