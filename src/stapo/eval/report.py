"""Markdown tables of evaluation results: one run (`results.md`) and several side by side (`--compare`).

Numbers are percentages with one decimal; "± x" is the standard error across problems (see
stapo.eval.metrics). The column order is the paper's: six benchmarks, then their unweighted average.
"""

from __future__ import annotations

import json
from pathlib import Path

from stapo.eval.protocol import BENCHMARK_TITLES, BENCHMARKS, SETTINGS

__all__ = ["METRICS", "compare_table", "load_results", "run_table"]

METRICS = ("avg@k", "pass@k", "maj@k")


def _pct(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if se is None else f"{100 * value:.1f} ± {100 * se:.1f}"


def _setting_title(name: str, settings: dict | None = None) -> str:
    s = (settings or {}).get(name)
    if s is None and name in SETTINGS:
        s = {"temperature": SETTINGS[name].temperature, "top_p": SETTINGS[name].top_p}
    return f"{name} (T={s['temperature']}, top-p={s['top_p']})" if s else name


def _columns(per_setting: dict) -> list[str]:
    return [b for b in BENCHMARKS if b in per_setting] + [b for b in per_setting if b not in BENCHMARKS and b != "average"]


def run_table(results: dict, with_se: bool = True) -> str:
    """The tables of one results.json: per setting, metrics as rows, benchmarks (+ Average) as columns."""
    lines: list[str] = []
    model = results.get("model", "?")
    lines.append(f"# stapo eval: {model}")
    lines.append("")
    lines.append(
        f"backend {results.get('backend', '?')}, max_new_tokens {results.get('max_new_tokens', '?')}, "
        f"seed {results.get('seed', '?')}, stapo {results.get('stapo_version', '?')}"
        + ("" if results.get("complete", True) else " — INCOMPLETE (partial results)")
    )
    for setting, per in results.get("results", {}).items():
        cols = _columns(per)
        ks = [str(per[b]["k"]) for b in cols]
        lines += ["", f"## {_setting_title(setting, results.get('settings'))}", ""]
        header = ["metric"] + [f"{BENCHMARK_TITLES.get(b, b)} (k={k}, n={per[b]['n_problems']})" for b, k in zip(cols, ks)]
        if "average" in per:
            header.append(f"Average ({len(per['average']['benchmarks'])})")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for m in METRICS:
            row = [m] + [_pct(per[b][m], per[b][f"{m}_se"] if with_se else None) for b in cols]
            if "average" in per:
                row.append(_pct(per["average"][m], per["average"][f"{m}_se"] if with_se else None))
            lines.append("| " + " | ".join(row) + " |")
    flagged = results.get("flagged", {})
    if any(flagged.values()):
        lines += ["", "Flagged problems (kept in the scores; they cannot be graded fairly):"]
        for b, items in flagged.items():
            if items:
                lines.append(f"- {BENCHMARK_TITLES.get(b, b)}: {len(items)} ({', '.join(i['id'] for i in items[:5])}"
                             + (", ..." if len(items) > 5 else "") + ")")
    return "\n".join(lines) + "\n"


def load_results(path: str | Path) -> dict:
    """results.json of a run directory (or the file itself); ValueError naming the path otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ValueError(f"{path}: no results.json there (is it a 'stapo eval' output directory?)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{p}: not a readable results file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{p}: not a 'stapo eval' results file (no 'results' object)")
    return data


def compare_table(runs: list[tuple[str, dict]], metric: str = "avg@k", with_se: bool = False) -> str:
    """The paper's table shape: one table per setting, runs as rows, benchmarks (+ Average) as columns.

    The Average column is recomputed over the benchmarks *all* runs share, so rows stay comparable;
    a run missing a benchmark shows "–" there.
    """
    if metric not in METRICS:
        raise ValueError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    settings: list[str] = []
    for _, r in runs:
        for s in r["results"]:
            if s not in settings:
                settings.append(s)
    lines: list[str] = []
    for setting in settings:
        present = [r["results"].get(setting, {}) for _, r in runs]
        cols = [b for b in BENCHMARKS if any(b in p for p in present)]
        shared = [b for b in cols if all(b in p for p in present)]
        lines += [f"## {metric}, {_setting_title(setting, runs[0][1].get('settings'))}", ""]
        header = ["run"] + [BENCHMARK_TITLES[b] for b in cols] + [f"Average ({len(shared)})"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for (name, _), per in zip(runs, present):
            row = [name]
            for b in cols:
                row.append(_pct(per[b][metric], per[b][f"{metric}_se"] if with_se else None) if b in per else "–")
            if shared and all(b in per for b in shared):
                avg = sum(per[b][metric] for b in shared) / len(shared)
                se = (sum(per[b][f"{metric}_se"] ** 2 for b in shared) ** 0.5) / len(shared)
                row.append(_pct(avg, se if with_se else None))
            else:
                row.append("–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)
