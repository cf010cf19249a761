#!/usr/bin/env python
"""STAPO vs GRPO, 20-Entropy and JustRL at small scale: one sweep, one report.

    python experiments/compare/run.py                       # the full sweep (see README.md for sizing)
    python experiments/compare/run.py --quick               # CI smoke test: 2 steps, 1 seed, tiny eval
    python experiments/compare/run.py --seeds 0,1 --methods grpo,stapo --steps 60 --out runs/compare
    python experiments/compare/run.py --report-only --out runs/compare    # re-aggregate finished runs

Every (method, seed) run is `stapo train <out>/config.yaml method=M seed=S output_dir=<out>/runs/M-seedS`
in its own process, one after the other: a crash loses one run, not the sweep, and a run whose
directory already holds `summary.json` is skipped, so an interrupted sweep resumes where it stopped.
`<out>/config.yaml` is configs/base.yaml (+ configs/quick.yaml with --quick) + --model/--steps/--set,
shared by every run, so the methods differ only in `method`.

Then the runs are aggregated per method (mean, min and max over seeds, step by step) into
    <out>/report.md        commands, machine, wall times, S2T thresholds and masked fraction, tables
    <out>/results.json     the same numbers, machine-readable
    <out>/plots/*.png      one figure per metric: a line per method (mean), a band (min..max over seeds)
    <out>/analyze/runs.html  `stapo analyze runs` over all run directories
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from stapo.core.settings import S2T_READINGS

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "configs" / "base.yaml"
QUICK_CONFIG = HERE / "configs" / "quick.yaml"
METHODS = ("grpo", "20-entropy", "justrl", "stapo", "stapo-former")
# Sweep entries that are a preset plus overrides: stapo with the S2T reading it shipped before it followed
# the paper (tau_p 0.01, the 5% quantile of the candidates' entropies capped at ln 2), next to the paper's.
_FORMER = S2T_READINGS["former"]
VARIANTS: dict[str, tuple[str, dict]] = {
    "stapo-former": ("stapo", {"tau_p": _FORMER.tau_p, "tau_h_quantile": _FORMER.tau_h_quantile,
                               "tau_h_max": _FORMER.tau_h_max}),
}
PER_RUN_KEYS = ("method", "seed", "output_dir")  # set by the sweep, never shared
RUN_INFO = "sweep_run.json"  # written by this script into each run directory (command, wall time, exit code)
SWEEP_INFO = "sweep.json"  # written into --out by the last invocation that trained (its command, wall time)
HELDOUT = "heldout_accuracy"

# curve -> (metrics.jsonl key, figure title). The held-out curve is assembled from eval.json + eval lines.
CURVES: dict[str, tuple[str, str]] = {
    HELDOUT: ("eval_heldout_accuracy", "held-out accuracy (avg@k)"),
    "reward": ("reward", "training reward (mean over the batch)"),
    "entropy": ("entropy", "policy entropy of sampled tokens (nats)"),
    "s2t_masked_frac": ("stapo/s2t_masked_frac", "S2T masked fraction (non-stapo: what S2T would mask)"),
    "clip_low": ("clip_ratio/low_mean", "clip fraction, low side (A < 0, r < 1 - eps)"),
    "clip_high": ("clip_ratio/high_mean", "clip fraction, high side (A > 0, r > 1 + eps_high)"),
    "response_length": ("completions/mean_length", "response length (tokens)"),
}


class SweepError(ValueError):
    """A bad argument or an unusable output directory; the message names it."""


# ----------------------------------------------------------------------------------------- arguments


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SweepError(f"--{what}: empty list")
    if len(set(items)) < len(items):
        raise SweepError(f"--{what}: duplicate entries in {text!r}")
    return items


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in parse_list(text, "seeds"):
        if not item.isdigit():
            raise SweepError(f"--seeds: {item!r} is not a non-negative integer (e.g. --seeds 0,1)")
        seeds.append(int(item))
    return seeds


def parse_methods(text: str) -> list[str]:
    from stapo.core import PRESETS

    methods = parse_list(text, "methods")
    for m in methods:
        if m not in PRESETS and m not in VARIANTS:
            raise SweepError(f"--methods: unknown method {m!r}; known: {', '.join([*PRESETS, *VARIANTS])}")
    return methods


def parse_sets(items: list[str]) -> dict:
    from stapo.config import ConfigError, parse_overrides

    try:
        values = parse_overrides(items)
    except ConfigError as err:
        raise SweepError(f"--set: {err.errors[0]}") from None
    for key in values:
        if key in PER_RUN_KEYS:
            raise SweepError(f"--set {key}=...: '{key}' is set per run by the sweep (use --methods / --seeds / --out)")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/compare/run.py",
        description="Small-scale STAPO vs GRPO / 20-Entropy / JustRL sweep and report.",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 seed, tiny eval (configs/quick.yaml)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; --quick: 0)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's max_steps)")
    p.add_argument("--model", default=None, help="'embedded' (default), a local model directory or a hub id")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a shared config field for every run (e.g. --set eval_every=20); repeatable")
    p.add_argument("--config", default=str(BASE_CONFIG), help="the shared base config (default configs/base.yaml)")
    p.add_argument("--out", default=None, help="sweep directory (default runs/compare, --quick: runs/compare-quick)")
    p.add_argument("--report-only", action="store_true", help="only re-aggregate the runs already in --out")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at the same time (default 1); each gets cores // jobs torch threads. "
                        "On a small CPU, 2 single-threaded runs finish sooner than 2 two-threaded runs in turn")
    p.add_argument("--smooth", type=int, default=None,
                   help="moving-average window (steps) for the per-step curves; default: steps // 10, at least 1")
    return p


# ---------------------------------------------------------------------------------------- the sweep


def shared_config(args) -> dict:
    """base.yaml (+ quick.yaml) + --model / --steps / --set: the config every run of the sweep shares."""
    from stapo.config import ConfigError, find_config, read_yaml

    try:
        cfg = read_yaml(find_config(args.config))
        if args.quick:
            cfg.update(read_yaml(QUICK_CONFIG))
    except ConfigError as err:
        raise SweepError(str(err)) from None
    for key in PER_RUN_KEYS:
        cfg.pop(key, None)
    if args.model is not None:
        cfg["model"] = args.model
    if args.steps is not None:
        if args.steps < 1:
            raise SweepError(f"--steps must be >= 1, got {args.steps}")
        cfg["max_steps"] = args.steps
    cfg.update(parse_sets(args.sets))
    return cfg


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}-seed{seed}"


def run_overrides(out: Path, method: str, seed: int) -> list[str]:
    preset, extra = VARIANTS.get(method, (method, {}))
    return [f"method={preset}", *(f"{k}={v}" for k, v in extra.items()), f"seed={seed}",
            f"output_dir={run_dir(out, method, seed)}"]


def validate_runs(config_path: Path, out: Path, methods: list[str], seeds: list[int]) -> None:
    """Resolve every run's config before training anything: one clear error instead of N failed runs."""
    from stapo.config import ConfigError, load_config

    for m in methods:
        try:
            load_config(config_path, run_overrides(out, m, seeds[0]))
        except ConfigError as err:
            raise SweepError(f"method {m}: {err}") from None


def _loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def is_complete(d: Path) -> bool:
    try:
        return isinstance(json.loads((d / "summary.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def train_one(config_path: Path, out: Path, method: str, seed: int, log=print, threads: int | None = None) -> dict:
    """One run in a child process; returns (and writes into the run directory) its sweep record."""
    d = run_dir(out, method, seed)
    # --overwrite: the directory holds train.log, and maybe a crashed earlier attempt; start clean
    cmd = [sys.executable, "-m", "stapo", "train", str(config_path), *run_overrides(out, method, seed), "--overwrite"]
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if threads is not None:  # torch reads OMP_NUM_THREADS at start-up
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    t0 = time.time()
    load0 = _loadavg()
    commit = git_commit()
    with (d / "train.log").open("w", encoding="utf-8") as logf:
        rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    info = {
        "method": method, "seed": seed, "command": shlex.join(["python", *cmd[1:]]), "returncode": rc,
        "threads": env.get("OMP_NUM_THREADS"), "git_commit": commit,
        "wall_s": round(time.time() - t0, 1), "loadavg_1m_start": load0,
        "loadavg_1m_end": _loadavg(),
        "completed": rc == 0 and is_complete(d),
    }
    (d / RUN_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    if not info["completed"]:
        tail = (d / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        log(f"  FAILED (exit {rc}); last lines of {d / 'train.log'}:\n    " + "\n    ".join(tail))
    return info


def threads_per_job(jobs: int) -> int | None:
    """Torch threads for each of `jobs` concurrent runs (None: leave the environment alone)."""
    if jobs <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def run_sweep(config_path: Path, out: Path, methods: list[str], seeds: list[int], log=print,
              jobs: int = 1) -> list[dict]:
    """Train every (method, seed) run not yet complete, `jobs` at a time; records in sweep order."""
    todo = [(m, s) for s in seeds for m in methods]  # seed-major: a partial sweep covers every method
    threads = threads_per_job(jobs)
    records: dict[int, dict] = {}

    def one(i: int, m: str, s: int) -> None:
        d = run_dir(out, m, s)
        if is_complete(d):
            log(f"[{i}/{len(todo)}] {m} seed {s}: already complete, skipped ({d})")
            records[i] = read_json(d / RUN_INFO) or {"method": m, "seed": s, "completed": True}
            return
        log(f"[{i}/{len(todo)}] {m} seed {s} -> {d}" + (f" ({threads} threads)" if threads else ""))
        info = train_one(config_path, out, m, s, log, threads=threads)
        log(f"[{i}/{len(todo)}] {m} seed {s}: {'done' if info['completed'] else 'failed'} in {info['wall_s']:.0f} s")
        records[i] = info

    if jobs <= 1:
        for i, (m, s) in enumerate(todo, 1):
            one(i, m, s)
    else:  # each run is its own child process; the threads here only wait on them
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for f in [pool.submit(one, i, m, s) for i, (m, s) in enumerate(todo, 1)]:
                f.result()
    return [records[i] for i in sorted(records)]


# -------------------------------------------------------------------------------------- aggregation


@dataclass
class Band:
    """A curve aggregated over seeds at the steps every seed logged."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray  # min over seeds
    hi: np.ndarray  # max over seeds
    seeds: int


@dataclass
class RunData:
    method: str
    seed: int
    path: Path
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # curve -> (steps, values)
    eval: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # every metrics.jsonl key


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_run_data(d: Path, method: str, seed: int) -> RunData:
    """A finished run's curves (through `stapo.analyze.runs.load_run`), eval.json and config."""
    from stapo.analyze.runs import load_run

    run = load_run(d)
    data = RunData(method, seed, d, eval=read_json(d / "eval.json"), config=dict(run.config),
                   info=read_json(d / RUN_INFO), raw=run.metrics)
    for curve, (key, _title) in CURVES.items():
        if key in run.metrics:
            data.curves[curve] = run.metrics[key]
    # held-out accuracy: step 0 = "before", the eval_every points, the last step = "after"
    points = {}
    if "before" in data.eval:
        points[0] = data.eval["before"]["accuracy"]
    if HELDOUT in data.curves:
        points.update(zip(data.curves[HELDOUT][0].tolist(), data.curves[HELDOUT][1].tolist()))
    if "after" in data.eval:
        last = int(max((s[-1] for s, _ in data.curves.values() if len(s)), default=0))
        last = max(last, int(data.config.get("max_steps") or 0))
        points[last] = data.eval["after"]["accuracy"]
    if points:
        steps = np.array(sorted(points), dtype=np.int64)
        data.curves[HELDOUT] = (steps, np.array([points[s] for s in steps], dtype=np.float64))
    return data


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
    """Mean, min and max over seeds at the steps all of them logged (each seed smoothed first)."""
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
        sm = moving_average(v, window)
        pos = {int(k): i for i, k in enumerate(s.tolist())}
        rows.append(sm[[pos[int(k)] for k in steps]])
    stack = np.vstack(rows)
    return Band(steps, stack.mean(axis=0), stack.min(axis=0), stack.max(axis=0), len(series))


def spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size), "values": a.tolist(),
    }


def window_mean(steps: np.ndarray, values: np.ndarray, which: str) -> float:
    """Mean over the first or last 10% of logged steps (at least one)."""
    k = max(1, len(values) // 10)
    return float(np.mean(values[:k] if which == "first" else values[-k:]))


def s2t_thresholds(runs: list[RunData]) -> dict:
    """The S2T thresholds the runs used: the stapo runs' config over the stapo preset's settings (the
    thresholds every other method measures with; `preset.s2t_settings`)."""
    from stapo.core import S2T_FIELDS, S2TSettings, get_preset

    cfg = next((r.config for r in runs if r.method == "stapo"), {})
    s = S2TSettings.resolve({k: cfg.get(k) for k in S2T_FIELDS}, base=get_preset("stapo").s2t_settings)
    return {"tau_p": s.tau_p, "tau_h": s.tau_h, "tau_h_quantile": None if s.tau_h is not None else s.tau_h_quantile,
            "tau_h_population": None if s.tau_h is not None else s.tau_h_population,
            "tau_h_max": None if s.tau_h is not None else s.tau_h_max}


def summarize(runs: list[RunData], methods: list[str]) -> dict:
    """Per method: held-out accuracy before/after and per-curve start/end/overall means, with spreads."""
    out: dict = {}
    for m in methods:
        mr = [r for r in runs if r.method == m]
        if not mr:
            continue
        res: dict = {"seeds": [r.seed for r in mr]}
        for when in ("before", "after"):
            vals = [r.eval[when]["accuracy"] for r in mr if when in r.eval]
            if vals:
                res[f"heldout_{when}"] = spread(vals)
                res[f"heldout_{when}_stderr"] = [r.eval[when].get("stderr") for r in mr if when in r.eval]
        for curve in CURVES:
            if curve == HELDOUT:
                continue
            have = [r for r in mr if curve in r.curves and len(r.curves[curve][1])]
            if not have:
                continue
            res[curve] = {
                "first10": spread([window_mean(*r.curves[curve], "first") for r in have]),
                "last10": spread([window_mean(*r.curves[curve], "last") for r in have]),
                "all": spread([float(np.mean(r.curves[curve][1])) for r in have]),
            }
        for key in ("stapo/entropy_threshold", "stapo/s2t_masked_count"):
            vals = [float(np.mean(r.raw[key][1])) for r in mr if key in r.raw]
            if vals:
                res[key] = spread(vals)
        totals = [float(np.sum(r.raw["stapo/s2t_masked_count"][1])) for r in mr if "stapo/s2t_masked_count" in r.raw]
        if totals:
            res["s2t_masked_total"] = spread(totals)
        out[m] = res
    return out


# ------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def draw_band(ax, bands: dict[str, Band], title: str) -> None:
    styles = ("-", "--", ":", "-.")  # identical curves (e.g. stapo with nothing masked vs justrl) stay visible
    for i, (method, b) in enumerate(bands.items()):
        color = f"C{i}"
        marker = "o" if len(b.steps) <= 12 else None
        ax.plot(b.steps, b.mean, color=color, lw=1.6, ls=styles[i % len(styles)], marker=marker, ms=3,
                label=f"{method} (n={b.seeds})")
        if b.seeds > 1:
            ax.fill_between(b.steps, b.lo, b.hi, color=color, alpha=0.18, lw=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def write_figures(bands: dict[str, dict[str, Band]], plots_dir: Path, window: int) -> list[Path]:
    """One PNG per curve (line: mean over seeds; band: min..max over seeds) and an overview of all."""
    plt = _pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = [c for c in CURVES if bands.get(c)]
    suffix = f" — {window}-step moving average" if window > 1 else ""

    def title(c):
        return CURVES[c][1] + ("" if c == HELDOUT else suffix)

    for c in names:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        draw_band(ax, bands[c], title(c))
        p = plots_dir / f"{c}.png"
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    if names:
        cols = 3
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
        for ax, c in zip(axes.flat, names):
            draw_band(ax, bands[c], textwrap.fill(title(c), 48))  # three panels a row: keep titles apart
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle("mean over seeds (line), min..max over seeds (band)", fontsize=10)
        fig.tight_layout()
        p = plots_dir / "overview.png"
        fig.savefig(p, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


# -------------------------------------------------------------------------------------------- report


def git_commit() -> str:
    """The short commit of this checkout ('' outside git); '+' marks uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+" if commit and dirty else "")


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("torch", "transformers", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version we cannot read is just not reported
            versions[mod] = "?"
    commit = git_commit()
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "gpu": torch.cuda.is_available(),
        "platform": platform.platform(), "python": platform.python_version(), **versions,
        "git_commit": commit, "loadavg_1m": _loadavg(),
    }


def fmt_spread(s: dict | None, digits: int = 3, pct: bool = False) -> str:
    if not s:
        return "—"
    k = 100.0 if pct else 1.0
    f = f"{{:.{digits}f}}"
    if s["n"] == 1:
        return f.format(s["mean"] * k)
    return f"{f.format(s['mean'] * k)} [{f.format(s['min'] * k)}, {f.format(s['max'] * k)}]"


def heldout_table(summary: dict) -> list[str]:
    lines = [
        "| method | seeds | held-out before | held-out after | change | per seed (after ± stderr) |",
        "|---|---|---|---|---|---|",
    ]
    for m, res in summary.items():
        b, a = res.get("heldout_before"), res.get("heldout_after")
        change = "—"
        if a and b and a["n"] == b["n"]:
            change = fmt_spread(spread([x - y for x, y in zip(a["values"], b["values"])]))
        per_seed = "—"
        if a:
            per_seed = ", ".join(
                f"{v:.3f} ± {se:.3f}" if isinstance(se, (int, float)) else f"{v:.3f}"
                for v, se in zip(a["values"], res.get("heldout_after_stderr", []))
            )
        lines.append(f"| {m} | {len(res['seeds'])} | {fmt_spread(b)} | {fmt_spread(a)} | {change} | {per_seed} |")
    return lines


def curves_table(summary: dict) -> list[str]:
    cols = [c for c in CURVES if c != HELDOUT]
    lines = ["| method | " + " | ".join(f"{c} (first 10% → last 10%)" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for m, res in summary.items():
        cells = []
        for c in cols:
            if c not in res:
                cells.append("—")
                continue
            d = 1 if c == "response_length" else 3
            cells.append(f"{fmt_spread(res[c]['first10'], d)} → {fmt_spread(res[c]['last10'], d)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def observations(summary: dict) -> list[str]:
    """Plain, mechanical statements about the data (no claims beyond what the numbers say)."""
    notes = []
    after = {m: r["heldout_after"] for m, r in summary.items() if "heldout_after" in r}
    if len(after) > 1 and all(a["n"] == 1 for a in after.values()):
        notes.append("One seed per method: there is no spread over seeds, so no difference between methods "
                     "can be told apart from seed noise.")
    elif len(after) > 1:
        best = max(after, key=lambda m: after[m]["mean"])
        worst = min(after, key=lambda m: after[m]["mean"])
        overlap = max(a["min"] for a in after.values()) <= min(a["max"] for a in after.values())
        notes.append(
            f"Held-out accuracy after training: highest mean {best} ({after[best]['mean']:.3f}), lowest {worst} "
            f"({after[worst]['mean']:.3f}); a gap of {after[best]['mean'] - after[worst]['mean']:.3f}. "
            + ("The min..max ranges over seeds of all methods overlap: at this number of seeds the ranking is "
               "not distinguishable from seed noise." if overlap else
               "Not every method's min..max range over seeds overlaps the others'; with this few seeds that is "
               "a hint, not a significant difference.")
        )
        if any(a["n"] < 3 for a in after.values()):
            notes.append("Fewer than 3 seeds per method: the bands are min..max of the seeds, "
                         "not confidence intervals.")
    for m, r in summary.items():
        if "entropy" in r:
            e0, e1 = r["entropy"]["first10"]["mean"], r["entropy"]["last10"]["mean"]
            notes.append(f"{m}: entropy {e0:.3f} → {e1:.3f} nats (mean of the first vs last 10% of steps, "
                         f"{100 * (e1 - e0) / e0:+.0f}%)." if e0 > 0 else f"{m}: entropy {e0:.3f} → {e1:.3f} nats.")
    return notes


def write_report(out: Path, argv: list[str], methods: list[str], seeds: list[int], runs: list[RunData],
                 missing: list[str], window: int, sweep_wall: float | None, html: str | None,
                 html_note: str | None, figures: list[Path]) -> tuple[Path, dict]:
    summary = summarize(runs, methods)
    machine = machine_info()
    th = s2t_thresholds(runs)
    shared = read_yaml_file(out / "config.yaml")
    walls = [r.info.get("wall_s") for r in runs if isinstance(r.info.get("wall_s"), (int, float))]
    # --report-only: the command and wall time of the sweep itself, as it recorded them
    sweep = read_json(out / SWEEP_INFO)
    command = str(sweep.get("command") or shlex.join(argv))
    if sweep_wall is None and isinstance(sweep.get("wall_s"), (int, float)):
        sweep_wall = float(sweep["wall_s"])
    regenerated = shlex.join(argv) if shlex.join(argv) != command else None
    results = {
        "command": command, "report_command": shlex.join(argv), "methods": methods, "seeds": seeds, "machine": machine,
        "s2t_thresholds": th, "summary": summary, "missing_runs": missing,
        "run_wall_s": {f"{r.method}-seed{r.seed}": r.info.get("wall_s") for r in runs},
        "total_run_wall_s": round(sum(walls), 1), "sweep_wall_s": sweep_wall,
        "shared_config": shared, "smoothing_window": window,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")

    model = Path(str(shared["model"])).name if shared.get("model") else "?"
    L = [f"# STAPO vs baselines at small scale — {model}", ""]
    L += ["## What was run", "", "```bash", command, "```", ""]
    if regenerated:
        L += [f"(This report was regenerated from the finished runs by `{regenerated}`.)", ""]
    L += [
          f"Methods: {', '.join(methods)}; seeds: {', '.join(map(str, seeds))}. Every run is",
          "", "```bash", f"python -m stapo train {out / 'config.yaml'} method=METHOD seed=SEED "
          f"output_dir={out / 'runs'}/METHOD-seedSEED", "```", "",
          "with the shared config below (the methods differ only in `method`):", "", "```yaml",
          yaml.safe_dump(shared, sort_keys=False).rstrip(), "```", ""]
    if missing:
        L += ["**Missing or failed runs** (not in the numbers below): " + ", ".join(missing), ""]
    L += ["## Machine and wall time", ""]
    L += [f"- CPU: {machine['cpu']} — {machine['cpu_count']} logical cores, torch threads {machine['torch_threads']}"
          f" (OMP_NUM_THREADS={machine['OMP_NUM_THREADS']}), GPU: {'yes' if machine['gpu'] else 'no'}",
          f"- {machine['platform']}, Python {machine['python']}, torch {machine['torch']}, "
          f"transformers {machine['transformers']}, trl {machine['trl']}, report written at commit "
          f"{machine['git_commit'] or '?'}",
          f"- total wall time of the runs: {sum(walls) / 60:.1f} min" +
          (f"; the sweep command: {sweep_wall / 60:.1f} min" if sweep_wall is not None else ""), "",
          "| run | wall (s) | torch threads | commit | load avg (1 min) at start → end |", "|---|---|---|---|---|"]
    for r in runs:
        i = r.info
        la = f"{i.get('loadavg_1m_start', '?')} → {i.get('loadavg_1m_end', '?')}" if i else "?"
        L.append(f"| {r.method}-seed{r.seed} | {i.get('wall_s', '?')} | "
                 f"{i.get('threads') or machine['torch_threads']} | {i.get('git_commit') or '?'} | {la} |")
    L += ["", "A load average above the core count means other processes shared the CPU (with `--jobs 2`, the "
          "sweep's own two runs make a load of 2): wall times are then upper bounds, and the numbers (not the "
          "timings) are unaffected.", ""]

    tau_h = (f"{th['tau_h']} nats" if th["tau_h"] is not None
             else f"the {th['tau_h_quantile']:g} quantile of the batch's token entropies")
    L += ["## S2T thresholds and the masked fraction they produced", "",
          f"tau_p = {th['tau_p']:g}, tau_h = {tau_h}. A token is silenced (stapo) when A > 0, p < tau_p and "
          "H < tau_h. The other methods log the same statistic as a diagnostic (what S2T would silence).", "",
          "| method | masked fraction, mean over steps | masked tokens per step | masked tokens in the run "
          "| tau_h in nats (mean over steps) |",
          "|---|---|---|---|---|"]
    for m, res in summary.items():
        frac = res.get("s2t_masked_frac", {}).get("all")
        L.append(f"| {m}{' (applied)' if m == 'stapo' else ' (diagnostic)'} | "
                 f"{fmt_spread(frac, 4, pct=True)}{' %' if frac else ''} | "
                 f"{fmt_spread(res.get('stapo/s2t_masked_count'), 2)} | {fmt_spread(res.get('s2t_masked_total'), 0)} | "
                 f"{fmt_spread(res.get('stapo/entropy_threshold'), 4)} |")
    L += ["", "Cells: mean over seeds [min, max over seeds] of each run's mean over its steps.", ""]

    L += ["## Held-out accuracy", ""] + heldout_table(summary)
    ev = next((r.eval.get("after") for r in runs if r.eval.get("after")), None)
    if ev:
        L += ["", f"avg@{ev.get('samples_per_problem')} over {ev.get('problems')} held-out problems; cells: mean over "
              "seeds [min, max]; per seed: the run's accuracy ± its standard error over problems."]
    L += ["", "## Curves (mean of the first vs the last 10% of logged steps)", ""] + curves_table(summary)
    L += ["", "## Observations (computed, not interpreted)", ""] + [f"- {n}" for n in observations(summary)]
    L += ["", "## Figures", "", "Line: mean over seeds; band: min..max over seeds" +
          (f"; per-step curves smoothed with a {window}-step trailing moving average (held-out accuracy is not)."
           if window > 1 else "."), ""]
    for p in figures:
        L += [f"![{p.stem}]({p.relative_to(out).as_posix()})", ""]
    if html:
        L += [f"`stapo analyze runs` over all run directories: [{html}]({html})", ""]
    if html_note:
        L += [f"`stapo analyze runs` report not written: {html_note}", ""]
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n", encoding="utf-8")
    return path, results


def read_yaml_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def analyze_html(out: Path, dirs: list[Path]) -> tuple[str | None, str | None]:
    """`stapo analyze runs DIR ... --out <out>/analyze` (the HTML report); (relative path, or an error note)."""
    target = out / "analyze"
    cmd = [sys.executable, "-m", "stapo", "analyze", "runs", *map(str, dirs), "--out", str(target)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as err:
        return None, str(err)
    html = target / "runs.html"
    if proc.returncode == 0 and html.is_file():
        return html.relative_to(out).as_posix(), None
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return None, tail[0]


def build_report(out: Path, argv: list[str], methods: list[str], seeds: list[int],
                 window: int | None, sweep_wall: float | None = None, log=print,
                 html: bool = True) -> tuple[Path, dict]:
    runs, missing = [], []
    for s in seeds:
        for m in methods:
            d = run_dir(out, m, s)
            if not is_complete(d):
                missing.append(f"{m}-seed{s}")
                continue
            runs.append(load_run_data(d, m, s))
    if not runs:
        raise SweepError(f"{out}: no completed run to report on (expected {out}/runs/METHOD-seedSEED/summary.json)")
    if window is None:
        longest = max((len(v[0]) for r in runs for k, v in r.curves.items() if k != HELDOUT), default=1)
        window = max(1, longest // 10)
    bands: dict[str, dict[str, Band]] = {}
    for curve in CURVES:
        for m in methods:
            series = [r.curves[curve] for r in runs if r.method == m and curve in r.curves]
            b = aggregate(series, 1 if curve == HELDOUT else window)
            if b is not None:
                bands.setdefault(curve, {})[m] = b
    figures = write_figures(bands, out / "plots", window)
    html_path, note = analyze_html(out, [r.path for r in runs]) if html else (None, None)
    if note:
        log(f"note: stapo analyze runs failed: {note}")
    return write_report(out, argv, methods, seeds, runs, missing, window, sweep_wall, html_path, note, figures)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    shown = ["python", "experiments/compare/run.py", *argv]
    try:
        methods = parse_methods(args.methods)
        seeds = parse_seeds(args.seeds if args.seeds is not None else ("0" if args.quick else "0,1"))
        if args.jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {args.jobs}")
        if args.smooth is not None and args.smooth < 1:
            raise SweepError(f"--smooth must be >= 1, got {args.smooth}")
        out = Path(args.out or ("runs/compare-quick" if args.quick else "runs/compare"))
        if out.exists() and not out.is_dir():
            raise SweepError(f"--out {out}: exists and is not a directory")
        t0 = time.time()
        failed = []
        if not args.report_only:
            cfg = shared_config(args)
            out.mkdir(parents=True, exist_ok=True)
            config_path = out / "config.yaml"
            previous = read_yaml_file(config_path)
            if previous and previous != cfg and any(is_complete(d) for d in (out / "runs").glob("*")):
                raise SweepError(
                    f"{config_path}: the finished runs in {out} used a different shared config; "
                    "use another --out (or delete the old runs) so the sweep stays comparable"
                )
            config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
            validate_runs(config_path, out, methods, seeds)
            print(f"sweep: {len(methods)} methods x {len(seeds)} seeds, {cfg.get('max_steps')} steps each -> {out}",
                  flush=True)
            records = run_sweep(config_path, out, methods, seeds, log=lambda s: print(s, flush=True),
                                jobs=args.jobs)
            failed = [f"{r['method']}-seed{r['seed']}" for r in records if not r.get("completed")]
        elif not (out / "runs").is_dir():
            raise SweepError(f"--report-only: {out}/runs does not exist (run the sweep first)")
        if failed and not any(is_complete(run_dir(out, m, s)) for m in methods for s in seeds):
            print(f"error: every run failed: {', '.join(failed)} (see train.log in their directories)", file=sys.stderr)
            return 1
        sweep_wall = None
        if not args.report_only:
            sweep_wall = round(time.time() - t0, 1)
            (out / SWEEP_INFO).write_text(json.dumps({"command": shlex.join(shown), "wall_s": sweep_wall}, indent=2),
                                          encoding="utf-8")
        report, _ = build_report(out, shown, methods, seeds, args.smooth, sweep_wall)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    if failed:
        print(f"failed runs: {', '.join(failed)} (see train.log in their directories)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
