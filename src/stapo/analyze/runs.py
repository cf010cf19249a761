"""Training curves of run directories (`metrics.jsonl`), overlaid across runs.

A run directory written by `stapo train` holds `metrics.jsonl`: one JSON object per logged step
with `step` and metric keys. Engines name the same quantity differently (TRL: `reward`,
`completions/mean_length`; verl: `critic/score/mean`, `response_length/mean`), so each curve is
looked up through a short list of candidate names (`CURVES`); the first one present in a run wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stapo.rundir import CONFIG_FILE, METRICS_FILE


# curve -> (title, candidate metric names in order of preference)
CURVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "reward": ("reward", ("reward", "rewards/mean", "critic/score/mean", "reward_mean")),
    "accuracy": ("training accuracy (reward > 0)", ("stapo/accuracy", "accuracy", "train_accuracy")),
    "heldout_accuracy": ("held-out accuracy", ("eval_heldout_accuracy", "val/accuracy", "eval_accuracy")),
    "entropy": ("policy entropy (nats)", ("entropy", "stapo/entropy_mean", "actor/entropy", "policy/entropy")),
    "s2t_masked_frac": ("S2T masked fraction", ("stapo/s2t_masked_frac", "s2t_masked_frac", "actor/s2t_masked_frac")),
    "clip_low": ("clip fraction (low)", ("clip_ratio/low_mean", "actor/pg_clipfrac_lower", "clip_ratio/low")),
    "clip_high": ("clip fraction (high)", ("clip_ratio/high_mean", "actor/pg_clipfrac", "clip_ratio/high")),
    "response_length": ("response length (tokens)", ("completions/mean_length", "response_length/mean", "response_length")),
}
# config keys whose difference across compared runs is worth a note (not an error)
CONFIG_NOTE_KEYS = ("model", "model_name_or_path", "data", "dataset", "num_generations", "group_size")
_PREFIXES = ("train/",)  # wandb-style prefixes some loggers add


class RunError(ValueError):
    """A run directory is missing, has no metrics, or cannot be compared; the message names it."""


@dataclass
class Run:
    name: str
    path: Path
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]  # raw key -> (steps, values)
    config: dict = field(default_factory=dict)
    curves: dict[str, tuple[str, np.ndarray, np.ndarray]] = field(default_factory=dict)  # curve -> (key, steps, values)


def _read_metrics(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    series: dict[str, dict[int, float]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise RunError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("step"), (int, float)) or isinstance(obj.get("step"), bool):
                raise RunError(f"{path}: line {lineno} has no numeric 'step'")
            if obj.get("kind") == "summary":  # end-of-training totals (train_runtime, ...), not a step
                continue
            step = int(obj["step"])
            for key, value in obj.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if not math.isfinite(value):
                    continue
                for pre in _PREFIXES:
                    if key.startswith(pre):
                        key = key[len(pre):]
                        break
                series.setdefault(key, {})[step] = float(value)  # a later line for a step wins
    out = {}
    for key, by_step in series.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[key] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Read a run directory's metrics (and config, when present) and resolve its curves."""
    p = Path(run_dir)
    if not p.exists():
        raise RunError(f"no such run directory: {p}")
    if not p.is_dir():
        raise RunError(f"{p}: not a directory (pass a run directory written by 'stapo train')")
    mpath = p / METRICS_FILE
    if not mpath.is_file():
        raise RunError(f"{p}: no {METRICS_FILE} (is it a run directory written by 'stapo train'?)")
    metrics = _read_metrics(mpath)
    if not metrics:
        raise RunError(f"{mpath}: no logged metrics (the run has not logged a step yet)")
    run = Run(name or p.resolve().name, p, metrics, _read_config(p / CONFIG_FILE))
    for curve, (_title, candidates) in CURVES.items():
        for key in candidates:
            if key in metrics:
                run.curves[curve] = (key, *metrics[key])
                break
        else:
            # TRL logs a per-function mean `rewards/<name>/mean` when there is one reward function
            reward_keys = sorted(k for k in metrics if k.startswith("rewards/") and k.endswith("/mean"))
            if curve == "reward" and reward_keys:
                run.curves[curve] = (reward_keys[0], *metrics[reward_keys[0]])
    return run


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """Load several runs for comparison; refuse duplicates and runs that share no curve."""
    if not run_dirs:
        raise RunError("no run directories given")
    resolved = [Path(d).resolve() for d in run_dirs]
    seen = {}
    for d, r in zip(run_dirs, resolved):
        if r in seen:
            raise RunError(f"run directory given twice: {d} (same as {seen[r]})")
        seen[r] = d
    names = [r.name for r in resolved]
    if len(set(names)) < len(names):  # same basename in different parents: use parent/name
        names = [f"{r.parent.name}/{r.name}" for r in resolved]
    runs = [load_run(d, n) for d, n in zip(run_dirs, names)]
    for run in runs:
        if not run.curves:
            keys = ", ".join(sorted(run.metrics)[:12])
            raise RunError(
                f"{run.path}: none of the known curves found in {METRICS_FILE} "
                f"(keys: {keys}); expected e.g. reward, entropy, stapo/s2t_masked_frac"
            )
    if len(runs) > 1:
        common = set.intersection(*(set(r.curves) for r in runs))
        if not common:
            desc = "; ".join(f"{r.name}: {', '.join(sorted(r.curves))}" for r in runs)
            raise RunError(f"the runs have no curve in common, nothing to overlay ({desc})")
    return runs


def config_differences(runs: list[Run]) -> list[str]:
    """Notes on config keys (model, data, group size) that differ between the runs."""
    notes = []
    for key in CONFIG_NOTE_KEYS:
        values = {r.name: r.config.get(key) for r in runs if key in r.config}
        if len(values) > 1 and len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            notes.append(f"runs differ in '{key}': " + ", ".join(f"{n}={v}" for n, v in values.items()))
    return notes


def curve_panels(runs: list[Run]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """`panels[curve][run name] = (steps, values)` for every curve present in at least one run."""
    panels = {}
    for curve in CURVES:
        per_run = {r.name: r.curves[curve][1:] for r in runs if curve in r.curves}
        if per_run:
            panels[curve] = per_run
    return panels


@dataclass
class EntropyStability:
    start: float  # mean of the first 10% of logged steps
    end: float  # mean of the last 10%
    max: float
    max_step: int
    spike_ratio: float  # max / median


def entropy_stability(run: Run) -> EntropyStability | None:
    if "entropy" not in run.curves:
        return None
    _, steps, values = run.curves["entropy"]
    k = max(1, len(values) // 10)
    med = float(np.median(values))
    i = int(np.argmax(values))
    return EntropyStability(float(values[:k].mean()), float(values[-k:].mean()), float(values[i]),
                            int(steps[i]), float(values[i] / med) if med > 0 else float("inf"))


def format_runs_table(runs: list[Run]) -> str:
    """Per run and curve: the metric key used, first and last logged value; plus entropy stability."""
    lines = []
    for r in runs:
        lines.append(f"{r.name}  ({r.path}, {max(len(v[1]) for v in r.metrics.values())} logged steps)")
        for curve, (key, steps, values) in r.curves.items():
            lines.append(f"  {curve:<16} {key:<28} step {steps[0]}: {values[0]:.4g}  ->  step {steps[-1]}: {values[-1]:.4g}")
        st = entropy_stability(r)
        if st is not None:
            lines.append(
                f"  entropy: start {st.start:.4g}, end {st.end:.4g}, max {st.max:.4g} at step {st.max_step} "
                f"({st.spike_ratio:.2f}x the median)"
            )
    return "\n".join(lines)
