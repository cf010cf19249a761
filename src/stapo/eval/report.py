"""Markdown tables of evaluation results: one run (`results.md`) and several side by side (`--compare`).

Numbers are percentages with one decimal; "± x" is the standard error across problems (see
stapo.eval.metrics); k is the samples per problem, n the problems. The column order is the paper's:
six benchmarks, then their unweighted average. Each table names the answer-extraction rule that
graded it, since `--extract` changes the scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from stapo.eval.protocol import BENCHMARK_TITLES, BENCHMARKS, SETTINGS

__all__ = ["EXTRACTION_RULES", "METRICS", "compare_table", "extraction_rule", "load_results", "run_table"]

METRICS = ("avg@k", "pass@k", "maj@k")

# `--extract` modes (stapo.rewards.EXTRACTION_MODES) in words, for the tables and --help.
EXTRACTION_RULES = {
    "auto": "last \\boxed{}, else 'answer is X', else the last number (as the training reward)",
    "answer": "last \\boxed{}, else 'answer is X'",
    "boxed": "last \\boxed{} only (strict)",
}


def extraction_rule(mode: str | None) -> str:
    """'auto: last \\boxed{}, else ...' for a results file's `extract` field."""
    if mode is None:
        return "unknown (not recorded)"
    return f"{mode}: {EXTRACTION_RULES[mode]}" if mode in EXTRACTION_RULES else str(mode)


def _pct(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if se is None else f"{100 * value:.1f} ± {100 * se:.1f}"


def _setting_title(name: str, settings: dict | None = None) -> str:
    s = (settings or {}).get(name)
    if s is None and name in SETTINGS:
        s = {"temperature": SETTINGS[name].temperature, "top_p": SETTINGS[name].top_p}
    if not s:
        return name
    if s["temperature"] == 0:
        return f"{name} (T=0)"
    return f"{name} (T={s['temperature']}, top-p={s['top_p']})"


def _columns(per_setting: dict) -> list[str]:
    known = [b for b in BENCHMARKS if b in per_setting]
    return known + [b for b in per_setting if b not in BENCHMARKS and b != "average"]


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
    lines.append("")
    lines.append(f"answer extraction: {extraction_rule(results.get('extract'))}")
    for setting, per in results.get("results", {}).items():
        cols = _columns(per)
        ks = [str(per[b]["k"]) for b in cols]
        lines += ["", f"## {_setting_title(setting, results.get('settings'))}", ""]
        header = ["metric"] + [f"{BENCHMARK_TITLES.get(b, b)} (k={k}, n={per[b]['n_problems']})"
                               for b, k in zip(cols, ks)]
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


def compare_table(runs: list[tuple[str, dict]], metric: str = "avg@k", with_se: bool = True,
                  settings: list[str] | None = None) -> str:
    """The paper's table shape: one table per setting, runs as rows, benchmarks (+ Average) as columns.

    Cells are "value ± SE" (with_se). k and n go into a benchmark's header when every run shares
    them, else into each cell. The Average column is recomputed over the benchmarks *all* runs
    share, so rows stay comparable; a run missing a benchmark shows "–" there. `settings`: only
    these (default: every setting of any run). A last column names each run's extraction rule.
    """
    if metric not in METRICS:
        raise ValueError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    found: list[str] = []
    for _, r in runs:
        for s in r["results"]:
            if s not in found:
                found.append(s)
    if settings is not None:
        missing = [s for s in settings if s not in found]
        if missing:
            raise ValueError(f"--setting: no run has results for {', '.join(missing)} "
                             f"(they have: {', '.join(found) or 'none'})")
        found = [s for s in found if s in settings]
    lines: list[str] = []
    for setting in found:
        present = [r["results"].get(setting, {}) for _, r in runs]
        cols = [b for b in BENCHMARKS if any(b in p for p in present)]
        shared = [b for b in cols if all(b in p for p in present)]
        kn = {b: {(p[b]["k"], p[b]["n_problems"]) for p in present if b in p} for b in cols}
        lines += [f"## {metric}, {_setting_title(setting, runs[0][1].get('settings'))}", ""]
        header = ["run"]
        for b in cols:
            title = BENCHMARK_TITLES[b]
            if len(kn[b]) == 1:
                (k, n), = kn[b]
                title += f" (k={k}, n={n})"
            header.append(title)
        header += [f"Average ({len(shared)})", "extraction"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for (name, run), per in zip(runs, present):
            row = [name]
            for b in cols:
                if b not in per:
                    row.append("–")
                    continue
                cell = _pct(per[b][metric], per[b][f"{metric}_se"] if with_se else None)
                if len(kn[b]) > 1:
                    cell += f" (k={per[b]['k']}, n={per[b]['n_problems']})"
                row.append(cell)
            if shared and all(b in per for b in shared):
                avg = sum(per[b][metric] for b in shared) / len(shared)
                se = (sum(per[b][f"{metric}_se"] ** 2 for b in shared) ** 0.5) / len(shared)
                row.append(_pct(avg, se if with_se else None))
            else:
                row.append("–")
            row.append(run.get("extract") or "?")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    modes = sorted({mode for _, run in runs if (mode := run.get("extract"))})
    lines += [f"extraction {extraction_rule(m)}" for m in modes]
    return "\n".join(lines) + ("\n" if modes else "")
