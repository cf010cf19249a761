"""Training curves of run directories (`metrics.jsonl`), overlaid across runs.

A run directory written by `stapo train` holds `metrics.jsonl`: one JSON object per logged step
with `step` and metric keys. Engines name the same quantity differently, so each curve is looked up
through its candidate names (`stapo.analyze.curves.CURVES`, which also holds every curve's title,
axis label and unit); the first one present in a run wins. The held-out accuracy curve is completed
from the run's `eval.json` (before training = step 0, after training = the last step) where
metrics.jsonl lacks those points, with each point's standard error and the evaluation's size
(problems, samples per problem).

Runs that differ only by seed are grouped by name: `grpo-seed0` and `grpo-seed1` form the group `grpo`
(`split_seed`, `group_runs`). `curve_bands` aggregates each group's curves over its runs (mean, min and
max at the steps every run logged, each run smoothed first), `group_summary` gives each group's
held-out accuracy before and after training (mean and spread over its runs), and `write_runs_report`
draws and writes it all (`stapo analyze runs`, experiments/compare/run.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stapo.analyze.curves import CURVES, HELDOUT, HELDOUT_STDERR_KEYS, S2T_MASKED, heldout_size_text, s2t_title
from stapo.rundir import (
    CURVES_FILE,
    EVAL_FILE,
    METRICS_FILE,
    RunDirError,
    atomic_write_bytes,
    read_json,
    read_run_config,
)

# config keys whose difference across compared runs is worth a note (not an error)
CONFIG_NOTE_KEYS = ("model", "model_name_or_path", "data", "dataset", "num_generations", "group_size")
_PREFIXES = ("train/",)  # wandb-style prefixes some loggers add
SEED_SUFFIX = re.compile(r"[-_]seed(\d+)$")  # `grpo-seed1`, `grpo_seed1`: the run `grpo` with seed 1
PER_RUN_CONFIG_KEYS = ("seed", "output_dir")  # may differ within a group of seeds


class RunError(ValueError):
    """A run directory is missing, has no metrics, or cannot be compared; the message names it."""


@dataclass
class Run:
    name: str
    path: Path
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]  # raw key -> (steps, values)
    config: dict = field(default_factory=dict)
    curves: dict[str, tuple[str, np.ndarray, np.ndarray]] = field(default_factory=dict)  # curve -> (key, steps, values)
    eval: dict = field(default_factory=dict)  # eval.json: held-out accuracy "before" / "after" training
    heldout_stderr: dict[int, float] = field(default_factory=dict)  # step -> standard error of its held-out point

    @property
    def method(self) -> str | None:
        """The config's method (None when the run has no config.yaml)."""
        method = self.config.get("method")
        return method if isinstance(method, str) else None

    @property
    def display_name(self) -> str:
        """The name figures and tables show: the folder name, with the method when the name does not say it."""
        return run_label(self.name, self.method)

    @property
    def heldout_size(self) -> tuple[int | None, int | None]:
        """(problems, samples per problem) of the held-out evaluation, as far as eval.json or the config say."""
        problems = samples = None
        for when in ("after", "before"):
            res = self.eval.get(when)
            if isinstance(res, dict):
                problems = problems or _positive_int(res.get("problems"))
                samples = samples or _positive_int(res.get("samples_per_problem"))
        return problems, samples or _positive_int(self.config.get("eval_samples"))

    @property
    def label(self) -> str:
        """The name without its `-seedN` suffix: runs with the same label form one group."""
        return split_seed(self.name)[0]

    @property
    def seed(self) -> int | None:
        """The config's seed, else the name's `-seedN` suffix."""
        seed = self.config.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else split_seed(self.name)[1]


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def applies_s2t(method: str | None) -> bool | None:
    """Whether the method's preset silences S2T's tokens (stapo) or only measures them; None: unknown."""
    if method is None:
        return None
    from stapo.core import PRESETS

    preset = PRESETS.get(method)
    return None if preset is None else bool(preset.filter.applies_s2t)


def split_seed(name: str) -> tuple[str, int | None]:
    """`grpo-seed1` -> ("grpo", 1); a name without the suffix -> (name, None)."""
    m = SEED_SUFFIX.search(name)
    if m is None or m.start() == 0:
        return name, None
    return name[: m.start()], int(m.group(1))


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
            step = obj.get("step") if isinstance(obj, dict) else None
            if not isinstance(step, (int, float)) or isinstance(step, bool):
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


def run_label(name: str, method: str | None) -> str:
    """How figures and tables name a run (or a group of seeds): its name, and its method where the name
    without its `-seedN` suffix is not the method (`runs/a` of method grpo: "a (grpo)")."""
    if method is None or split_seed(name)[0] == method:
        return name
    return f"{name} ({method})"


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
    try:
        config = read_run_config(p)
    except RunDirError as err:
        raise RunError(str(err)) from None
    run = Run(name or p.resolve().name, p, metrics, config, eval=read_json(p / EVAL_FILE))
    for curve, spec in CURVES.items():
        for key in spec.keys:
            if key in metrics:
                run.curves[curve] = (key, *metrics[key])
                break
        else:
            # TRL logs a per-function mean `rewards/<name>/mean` when there is one reward function
            reward_keys = sorted(k for k in metrics if k.startswith("rewards/") and k.endswith("/mean"))
            if curve == "reward" and reward_keys:
                run.curves[curve] = (reward_keys[0], *metrics[reward_keys[0]])
    _complete_heldout(run)
    return run


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _complete_heldout(run: Run) -> None:
    """Add eval.json's held-out accuracy before training (step 0) and after it (the last logged step, or
    the config's max_steps) where the held-out curve has no point at that step; collect each point's
    standard error (metrics.jsonl's `eval_heldout_stderr`, eval.json's `stderr`)."""
    before, after = (run.eval.get(w) for w in ("before", "after"))
    key, steps, values = run.curves.get(HELDOUT, (EVAL_FILE, np.zeros(0, np.int64), np.zeros(0)))
    points = dict(zip(steps.tolist(), values.tolist()))
    for se_key in HELDOUT_STDERR_KEYS:
        if se_key in run.metrics:
            se_steps, se_values = run.metrics[se_key]
            run.heldout_stderr.update({int(s): float(v) for s, v in zip(se_steps, se_values) if int(s) in points})
            break
    evaluated = []  # (step, eval.json entry)
    if isinstance(before, dict) and _number(before.get("accuracy")) is not None:
        evaluated.append((0, before))
    if isinstance(after, dict) and _number(after.get("accuracy")) is not None:
        last = max((int(s[-1]) for s, _ in run.metrics.values() if len(s)), default=0)
        max_steps = run.config.get("max_steps")
        last = max(last, max_steps if isinstance(max_steps, int) and not isinstance(max_steps, bool) else 0)
        evaluated.append((last, after))
    for step, res in evaluated:
        if step not in points:
            points[step] = float(res["accuracy"])
        if step not in run.heldout_stderr and points[step] == float(res["accuracy"]) \
                and _number(res.get("stderr")) is not None:
            run.heldout_stderr[step] = float(res["stderr"])
    if points:
        order = sorted(points)
        run.curves[HELDOUT] = (key, np.array(order, dtype=np.int64), np.array([points[k] for k in order]))


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Load several runs for comparison; refuse duplicates and runs that share no curve."""
    if not run_dirs:
        raise RunError("no run directories given")
    resolved = [Path(d).resolve() for d in run_dirs]
    seen: dict[Path, str | Path] = {}
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


class Series(NamedTuple):
    """One run's curve, as `curves_png` draws it: (steps, values), and what the figure says of the run."""

    steps: np.ndarray
    values: np.ndarray
    stderr: np.ndarray | None = None  # held-out accuracy: each point's standard error (nan: unknown)
    problems: int | None = None  # held-out accuracy: problems evaluated
    samples: int | None = None  # held-out accuracy: samples per problem (the k of avg@k)
    method: str | None = None  # the run's method (config.yaml)


def _stderr_at(run: Run, steps: np.ndarray) -> np.ndarray | None:
    if not run.heldout_stderr:
        return None
    return np.array([run.heldout_stderr.get(int(s), np.nan) for s in steps], dtype=np.float64)


def curve_panels(runs: list[Run]) -> dict[str, dict[str, Series]]:
    """`panels[curve][run name]`: the run's `Series` for every curve present in at least one run."""
    panels = {}
    for curve in CURVES:
        per_run = {}
        for r in runs:
            if curve not in r.curves:
                continue
            _, steps, values = r.curves[curve]
            if curve == HELDOUT:
                per_run[r.name] = Series(steps, values, _stderr_at(r, steps), *r.heldout_size, r.method)
            else:
                per_run[r.name] = Series(steps, values, method=r.method)
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
    """Per run and curve (titles and units of `CURVES`): the first and last logged value and the metric
    key read; plus entropy stability."""
    def label(run: Run, curve: str) -> str:
        spec = CURVES[curve]
        if curve == S2T_MASKED:  # silenced (stapo) or only measured (the other methods)
            return f"{s2t_title({applies_s2t(run.method)})} ({spec.unit})"
        return spec.label

    lines = []
    width = max(len(label(r, c)) for r in runs for c in r.curves)
    for r in runs:
        lines.append(f"{r.display_name}  ({r.path}, {max(len(v[1]) for v in r.metrics.values())} logged steps)")
        for curve, (key, steps, values) in r.curves.items():
            spec = CURVES[curve]
            lines.append(f"  {label(r, curve):<{width}}  step {steps[0]}: {spec.fmt(values[0], 4)}  ->  "
                         f"step {steps[-1]}: {spec.fmt(values[-1], 4)}   ({key})")
        st = entropy_stability(r)
        if st is not None:
            lines.append(
                f"  entropy: start {st.start:.4g}, end {st.end:.4g}, max {st.max:.4g} at step {st.max_step} "
                f"({st.spike_ratio:.2f}x the median)"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ groups of seeds


@dataclass
class Band:
    """A curve aggregated over the runs of a group at the steps every one of them logged."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray  # min over the runs
    hi: np.ndarray  # max over the runs
    n: int  # runs aggregated
    stderr: np.ndarray | None = None  # held-out accuracy of one run: each point's standard error
    problems: int | None = None  # held-out accuracy: problems evaluated (None: unknown or differing)
    samples: int | None = None  # held-out accuracy: samples per problem (None: unknown or differing)
    method: str | None = None  # the runs' method (None: unknown or differing)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` points (fewer at the start)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    start = np.maximum(idx - window, 0)
    return (c[idx] - c[start]) / (idx - start)


def aggregate(series: list[tuple[np.ndarray, np.ndarray]], window: int = 1) -> Band | None:
    """Mean, min and max over the series at the steps all of them logged (each smoothed first, over
    all its points); None when there is no series or no step in common."""
    if not series:
        return None
    common = set(series[0][0].tolist())
    for steps, _ in series[1:]:
        common &= set(steps.tolist())
    if not common:
        return None
    steps = np.array(sorted(common), dtype=np.int64)
    rows = []
    for s, v in series:
        pos = {int(k): i for i, k in enumerate(s.tolist())}
        rows.append(moving_average(v, window)[[pos[int(k)] for k in steps]])
    stack = np.vstack(rows)
    return Band(steps, stack.mean(axis=0), stack.min(axis=0), stack.max(axis=0), len(series))


def group_runs(runs: list[Run], by_seed: bool = True) -> dict[str, list[Run]]:
    """label -> its runs, in the order the labels first appear. `by_seed`: runs whose names differ only
    by a `-seedN` suffix share a label; else every run is a group of its own, under its name."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.label if by_seed else r.name, []).append(r)
    return groups


def _common(values):
    """The one value all entries share, else None."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def curve_bands(groups: dict[str, list[Run]], window: int = 1) -> dict[str, dict[str, Band]]:
    """`bands[curve][label]`: the group's runs that have the curve, aggregated (`aggregate`); the
    per-step curves are smoothed over `window` steps, held-out accuracy (a few points) never. A
    held-out band of one run carries its points' standard errors; every band its runs' common method
    and evaluation size."""
    bands: dict[str, dict[str, Band]] = {}
    for curve in CURVES:
        for label, runs in groups.items():
            have = [r for r in runs if curve in r.curves]
            b = aggregate([r.curves[curve][1:] for r in have], 1 if curve == HELDOUT else window)
            if b is None:
                continue
            b.method = _common(r.method for r in have)
            if curve == HELDOUT:
                b.problems = _common(r.heldout_size[0] for r in have)
                b.samples = _common(r.heldout_size[1] for r in have)
                if len(have) == 1:
                    b.stderr = _stderr_at(have[0], b.steps)
            bands.setdefault(curve, {})[label] = b
    return bands


def spread(values: list[float]) -> dict:
    """mean, min, max, sample std (0 for one value), n and the values themselves."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size), "values": a.tolist(),
    }


def fmt_spread(s: dict | None, digits: int = 3, pct: bool = False) -> str:
    """"mean [min, max]" ("mean" alone for one value, "—" for none); `pct`: times 100."""
    if not s:
        return "—"
    k = 100.0 if pct else 1.0
    f = f"{{:.{digits}f}}"
    if s["n"] == 1:
        return f.format(s["mean"] * k)
    return f"{f.format(s['mean'] * k)} [{f.format(s['min'] * k)}, {f.format(s['max'] * k)}]"


def heldout_spreads(runs: list[Run]) -> dict:
    """Held-out accuracy over the runs: "heldout_before" (each run's point at step 0) and
    "heldout_after" (each run's last point: after training, or the latest evaluation of an unfinished
    run), as `spread`s; a key is absent when no run has that point."""
    have = [r.curves[HELDOUT] for r in runs if HELDOUT in r.curves]
    out = {}
    before = [float(v[0]) for _, s, v in have if s[0] == 0]
    if before:
        out["heldout_before"] = spread(before)
    if have:
        out["heldout_after"] = spread([float(v[-1]) for _, _, v in have])
    return out


def group_summary(groups: dict[str, list[Run]]) -> dict[str, dict]:
    """Per group: its runs, their seeds and `heldout_spreads`."""
    return {label: {"runs": [r.name for r in runs], "seeds": [r.seed for r in runs], **heldout_spreads(runs)}
            for label, runs in groups.items()}


def group_notes(groups: dict[str, list[Run]]) -> list[str]:
    """Groups whose runs' configs differ in more than the seed (the name put them together; the
    configs say they are not repeats of one run)."""
    notes = []
    for label, runs in groups.items():
        cfgs = [r.config for r in runs if r.config]
        if len(cfgs) < 2:
            continue
        keys = sorted({k for c in cfgs for k in c} - set(PER_RUN_CONFIG_KEYS))
        differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in cfgs}) > 1]
        if differ:
            notes.append(f"group '{label}': its runs' configs differ in more than the seed: {', '.join(differ)}")
    return notes


def format_groups_table(summary: dict[str, dict]) -> str:
    """One line per group: runs, seeds, held-out accuracy before and after (mean [min, max], std)."""
    rows = [("group", "runs", "seeds", "held-out before", "held-out after", "after std")]
    for label, g in summary.items():
        after = g.get("heldout_after")
        rows.append((label, str(len(g["runs"])), ",".join("?" if s is None else str(s) for s in g["seeds"]),
                     fmt_spread(g.get("heldout_before")), fmt_spread(after),
                     f"{after['std']:.3f}" if after and after["n"] > 1 else "—"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "groups (runs named NAME-seedN; cells: mean [min, max] over the group's runs)\n" + "\n".join(lines)


def heldout_notes(runs: list[Run]) -> list[str]:
    """A note when the runs' held-out accuracies come from evaluations of different sizes (problems,
    samples per problem): their points are then not measured alike."""
    sizes = {r.display_name: r.heldout_size for r in runs if HELDOUT in r.curves}
    if len(set(sizes.values())) <= 1:
        return []
    return ["held-out accuracy measured differently: " + "; ".join(
        f"{name}: {heldout_size_text(*size) or 'size not recorded'}" for name, size in sizes.items())]


def _heldout_cell(run: Run, which: str) -> str:
    if HELDOUT not in run.curves:
        return "—"
    _, steps, values = run.curves[HELDOUT]
    i = 0 if which == "before" else len(steps) - 1
    if which == "before" and steps[0] != 0:
        return "—"
    spec = CURVES[HELDOUT]
    se = run.heldout_stderr.get(int(steps[i]))
    return spec.fmt(values[i]) + (f" ± {spec.fmt(se)}" if se is not None and math.isfinite(se) else "")


def format_side_by_side(runs: list[Run]) -> str:
    """One column per run, one row per number: held-out accuracy before and after training (± standard
    error over problems) and its evaluation, whether S2T is applied, then each curve's first -> last logged
    value (titles and units of `CURVES`)."""
    held = CURVES[HELDOUT]
    rows = [(f"{held.label}, before training", [_heldout_cell(r, "before") for r in runs]),
            (f"{held.label}, after training", [_heldout_cell(r, "after") for r in runs]),
            ("held-out evaluation", [heldout_size_text(*r.heldout_size) or "—" if HELDOUT in r.curves else "—"
                                     for r in runs]),
            ("S2T in the loss", [{True: "applied", False: "measured only", None: "—"}[applies_s2t(r.method)]
                                 for r in runs]),
            ("first → last logged step:", [""] * len(runs))]
    for curve, spec in CURVES.items():
        if curve == HELDOUT or not any(curve in r.curves for r in runs):
            continue
        cells = []
        for r in runs:
            if curve not in r.curves:
                cells.append("—")
                continue
            _, _, values = r.curves[curve]
            cells.append(spec.fmt(values[0]) if len(values) == 1 else f"{spec.fmt(values[0])} → {spec.fmt(values[-1])}")
        rows.append((f"  {spec.label}", cells))
    head = ("", [r.display_name for r in runs])
    widths = [max(len(name) for name, _ in [head, *rows])]
    widths += [max(len(head[1][j]), *(len(cells[j]) for _, cells in rows)) for j in range(len(runs))]
    lines = ["  ".join([name.ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells, widths[1:]))]).rstrip()
             for name, cells in [head, *rows]]
    return "\n".join(lines)


def write_runs_report(runs: list[Run], out: str | Path, html: str | Path | None = None, window: int = 1,
                      by_seed: bool = True) -> dict:
    """The figure (a line per group: the mean over its runs, a min..max band where it has several),
    the text tables and the HTML report of `stapo analyze runs`. Writes <out>/curves.png and the HTML
    (default <out>/runs.html); returns {"png", "html", "text", "notes", "groups"}."""
    from stapo.analyze import plots, report

    groups = group_runs(runs, by_seed)
    grouped = any(len(g) > 1 for g in groups.values())
    png = plots.curves_png(curve_bands(groups, window), window=window)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png_path = atomic_write_bytes(out / CURVES_FILE, png)
    notes = config_differences(runs) + group_notes(groups) + heldout_notes(runs)
    summary = group_summary(groups)
    text = format_runs_table(runs) + ("\n\n" + format_groups_table(summary) if grouped else "")
    title = "stapo analyze runs — " + ", ".join(r.display_name for r in runs)
    html_path = report.write_report(Path(html) if html else out / "runs.html",
                                    report.build_report(title, curves_png=png, runs_text=text, notes=notes))
    return {"png": png_path, "html": html_path, "text": text, "notes": notes, "groups": summary}
