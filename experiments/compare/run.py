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
    <out>/analyze/runs.html  `stapo analyze runs --no-group` over all run directories (a line per run)
Reading the runs, the curves, the aggregation over seeds and the figures are `stapo.analyze.runs` and
`stapo.analyze.plots`, as in `stapo analyze runs` (whose groups of `NAME-seedN` runs are the methods here).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from stapo.analyze.plots import curves_png
from stapo.analyze.runs import (
    CURVES,
    HELDOUT,
    Band,
    Run,
    RunError,
    curve_bands,
    fmt_spread,
    heldout_spreads,
    load_run,
    spread,
    write_runs_report,
)
from stapo.core.settings import S2T_READINGS
from stapo.rundir import (
    CONFIG_FILE,
    SUMMARY_FILE,
    RunDirError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_run_config,
)

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
TRAIN_LOG = "train.log"  # each run's console output, in its run directory
SWEEP_INFO = "sweep.json"  # written into --out by the last invocation that trained (its command, wall time)
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


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
    """The run wrote its summary.json (`stapo train` writes it last)."""
    return bool(read_json(d / SUMMARY_FILE))


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
    with (d / TRAIN_LOG).open("w", encoding="utf-8") as logf:
        rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    info = {
        "method": method, "seed": seed, "command": shlex.join(["python", *cmd[1:]]), "returncode": rc,
        "threads": env.get("OMP_NUM_THREADS"), "git_commit": commit,
        "wall_s": round(time.time() - t0, 1), "loadavg_1m_start": load0,
        "loadavg_1m_end": _loadavg(),
        "completed": rc == 0 and is_complete(d),
    }
    atomic_write_json(d / RUN_INFO, info)
    if not info["completed"]:
        tail = (d / TRAIN_LOG).read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        log(f"  FAILED (exit {rc}); last lines of {d / TRAIN_LOG}:\n    " + "\n    ".join(tail))
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
# Reading the runs, the curve list, the mean/min/max over seeds and the figures are `stapo.analyze.runs`
# (what `stapo analyze runs` does with any run directories); this script adds the sweep's tables.


def load_runs_of(out: Path, methods: list[str], seeds: list[int], log=print) -> tuple[list[Run], list[str]]:
    """The completed runs (named METHOD-seedSEED: their group label is the method) and the missing ones."""
    runs, missing = [], []
    for s in seeds:
        for m in methods:
            d = run_dir(out, m, s)
            if not is_complete(d):
                missing.append(d.name)
                continue
            try:
                runs.append(load_run(d, d.name))
            except RunError as err:  # complete, yet unreadable (an edited metrics.jsonl): listed as missing
                missing.append(d.name)
                log(f"note: {err}")
    return runs, missing


def window_mean(steps: np.ndarray, values: np.ndarray, which: str) -> float:
    """Mean over the first or last 10% of logged steps (at least one)."""
    k = max(1, len(values) // 10)
    return float(np.mean(values[:k] if which == "first" else values[-k:]))


def s2t_thresholds(runs: list[Run]) -> dict:
    """The S2T thresholds the runs used: the stapo runs' config over the stapo preset's settings (the
    thresholds every other method measures with; `preset.s2t_settings`)."""
    from stapo.core import S2T_FIELDS, S2TSettings, get_preset

    cfg = next((r.config for r in runs if r.label == "stapo"), {})
    s = S2TSettings.resolve({k: cfg.get(k) for k in S2T_FIELDS}, base=get_preset("stapo").s2t_settings)
    return {"tau_p": s.tau_p, "tau_h": s.tau_h, "tau_h_quantile": None if s.tau_h is not None else s.tau_h_quantile,
            "tau_h_population": None if s.tau_h is not None else s.tau_h_population,
            "tau_h_max": None if s.tau_h is not None else s.tau_h_max}


def summarize(runs: list[Run], methods: list[str]) -> dict:
    """Per method: held-out accuracy before/after and per-curve start/end/overall means, with spreads."""
    out: dict = {}
    for m in methods:
        mr = [r for r in runs if r.label == m]
        if not mr:
            continue
        res: dict = {"seeds": [r.seed for r in mr], **heldout_spreads(mr)}
        for when in ("before", "after"):  # each run's standard error over problems, in the order of the values
            if f"heldout_{when}" in res:
                res[f"heldout_{when}_stderr"] = [
                    r.eval.get(when, {}).get("stderr") for r in mr
                    if HELDOUT in r.curves and (when == "after" or r.curves[HELDOUT][1][0] == 0)]
        for curve in CURVES:
            if curve == HELDOUT:
                continue
            have = [r.curves[curve][1:] for r in mr if curve in r.curves and len(r.curves[curve][2])]
            if not have:
                continue
            res[curve] = {
                "first10": spread([window_mean(*c, "first") for c in have]),
                "last10": spread([window_mean(*c, "last") for c in have]),
                "all": spread([float(np.mean(c[1])) for c in have]),
            }
        for key in ("stapo/entropy_threshold", "stapo/s2t_masked_count"):
            vals = [float(np.mean(r.metrics[key][1])) for r in mr if key in r.metrics]
            if vals:
                res[key] = spread(vals)
        totals = [float(np.sum(r.metrics["stapo/s2t_masked_count"][1])) for r in mr
                  if "stapo/s2t_masked_count" in r.metrics]
        if totals:
            res["s2t_masked_total"] = spread(totals)
        out[m] = res
    return out


def write_figures(bands: dict[str, dict[str, Band]], plots_dir: Path, window: int) -> list[Path]:
    """One PNG per curve (line: mean over seeds; band: min..max over seeds) and an overview of all."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write_bytes(plots_dir / f"{c}.png", curves_png({c: b}, window)) for c, b in bands.items()]
    if bands:
        paths.append(atomic_write_bytes(plots_dir / "overview.png", curves_png(
            bands, window, suptitle="mean over seeds (line), min..max over seeds (band)")))
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


def write_report(out: Path, argv: list[str], methods: list[str], seeds: list[int], runs: list[Run],
                 missing: list[str], window: int, sweep_wall: float | None, html: str | None,
                 html_note: str | None, figures: list[Path]) -> tuple[Path, dict]:
    summary = summarize(runs, methods)
    machine = machine_info()
    th = s2t_thresholds(runs)
    try:
        shared = read_run_config(out)  # the sweep's shared config: a run config, less method, seed, output_dir
    except RunDirError as err:
        raise SweepError(str(err)) from None
    info = {r.name: read_json(r.path / RUN_INFO) for r in runs}
    walls = [i["wall_s"] for i in info.values() if isinstance(i.get("wall_s"), (int, float))]
    # --report-only: the command and wall time of the sweep itself, as it recorded them
    sweep = read_json(out / SWEEP_INFO)
    command = str(sweep.get("command") or shlex.join(argv))
    if sweep_wall is None and isinstance(sweep.get("wall_s"), (int, float)):
        sweep_wall = float(sweep["wall_s"])
    regenerated = shlex.join(argv) if shlex.join(argv) != command else None
    results = {
        "command": command, "report_command": shlex.join(argv), "methods": methods, "seeds": seeds, "machine": machine,
        "s2t_thresholds": th, "summary": summary, "missing_runs": missing,
        "run_wall_s": {r.name: info[r.name].get("wall_s") for r in runs},
        "total_run_wall_s": round(sum(walls), 1), "sweep_wall_s": sweep_wall,
        "shared_config": shared, "smoothing_window": window,
    }
    atomic_write_json(out / RESULTS_FILE, results)

    model = Path(str(shared["model"])).name if shared.get("model") else "?"
    L = [f"# STAPO vs baselines at small scale — {model}", ""]
    L += ["## What was run", "", "```bash", command, "```", ""]
    if regenerated:
        L += [f"(This report was regenerated from the finished runs by `{regenerated}`.)", ""]
    L += [
          f"Methods: {', '.join(methods)}; seeds: {', '.join(map(str, seeds))}. Every run is",
          "", "```bash", f"python -m stapo train {out / CONFIG_FILE} method=METHOD seed=SEED "
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
        i = info[r.name]
        la = f"{i.get('loadavg_1m_start', '?')} → {i.get('loadavg_1m_end', '?')}" if i else "?"
        L.append(f"| {r.name} | {i.get('wall_s', '?')} | "
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
    applied = {r.label for r in runs if r.config.get("method") == "stapo"}  # the stapo preset and its variants
    for m, res in summary.items():
        frac = res.get("s2t_masked_frac", {}).get("all")
        L.append(f"| {m}{' (applied)' if m in applied else ' (diagnostic)'} | "
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
        L += [f"`stapo analyze runs --no-group` over all run directories (a line per run): [{html}]({html})", ""]
    if html_note:
        L += [f"`stapo analyze runs` report not written: {html_note}", ""]
    path = atomic_write_text(out / REPORT_FILE, "\n".join(L) + "\n")
    return path, results


def analyze_html(out: Path, runs: list[Run]) -> tuple[str | None, str | None]:
    """`stapo analyze runs --no-group RUN_DIR ... --out <out>/analyze` (a line per run, entropy stability);
    (its path relative to `out`, or why it was not written)."""
    try:
        res = write_runs_report(runs, out / "analyze", by_seed=False)
    except Exception as err:  # noqa: BLE001 - the HTML is a convenience; the report goes on without it
        return None, f"{type(err).__name__}: {err}"
    return res["html"].relative_to(out).as_posix(), None


def build_report(out: Path, argv: list[str], methods: list[str], seeds: list[int],
                 window: int | None, sweep_wall: float | None = None, log=print,
                 html: bool = True) -> tuple[Path, dict]:
    runs, missing = load_runs_of(out, methods, seeds, log)
    if not runs:
        raise SweepError(f"{out}: no completed run to report on (expected {out}/runs/METHOD-seedSEED/summary.json)")
    if window is None:
        longest = max((len(v[1]) for r in runs for k, v in r.curves.items() if k != HELDOUT), default=1)
        window = max(1, longest // 10)
    groups = {m: [r for r in runs if r.label == m] for m in methods}
    figures = write_figures(curve_bands({m: g for m, g in groups.items() if g}, window), out / "plots", window)
    html_path, note = analyze_html(out, runs) if html else (None, None)
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
            config_path = out / CONFIG_FILE
            try:
                previous = read_run_config(out)
            except RunDirError as err:
                raise SweepError(f"{err} (the shared config of an earlier sweep in {out})") from None
            if previous and previous != cfg and any(is_complete(d) for d in (out / "runs").glob("*")):
                raise SweepError(
                    f"{config_path}: the finished runs in {out} used a different shared config; "
                    "use another --out (or delete the old runs) so the sweep stays comparable"
                )
            atomic_write_text(config_path, yaml.safe_dump(cfg, sort_keys=False))
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
            atomic_write_json(out / SWEEP_INFO, {"command": shlex.join(shown), "wall_s": sweep_wall})
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
