"""The training-curve figures a person reads: a run's plots/curves.png (`stapo.train.plot_runs`), the
`stapo analyze runs` figure and `stapo demo --compare`'s compare.png and printed table.

The figures are checked on the matplotlib objects: titles, y-axis labels, held-out accuracy drawn as
points with error bars and the evaluation's size, the y-range of a constant panel, one legend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from stapo.analyze import plots
from stapo.analyze.curves import CURVES
from stapo.analyze.runs import curve_bands, curve_panels, group_runs, load_runs
from stapo.cli import main

RAW_KEYS = set(CURVES) | {k for c in CURVES.values() for k in c.keys}


def _run(path: Path, method: str, heldout=(0.2, 0.3), problems=32, samples=4, masked=0.0) -> Path:
    """A 2-step run as `stapo train` writes it: 0/1 rewards (reward = accuracy), no clipping, two evaluations."""
    path.mkdir(parents=True)
    rows = [{"step": s, "kind": "train", "reward": 0.25 * s, "stapo/accuracy": 0.25 * s, "entropy": 1.2 - 0.1 * s,
             "stapo/s2t_masked_frac": masked * s, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0,
             "completions/mean_length": 40.0 + s} for s in (1, 2)]
    rows += [{"step": 0, "kind": "eval", "eval_heldout_accuracy": heldout[0], "eval_heldout_stderr": 0.05},
             {"step": 2, "kind": "eval", "eval_heldout_accuracy": heldout[1], "eval_heldout_stderr": 0.06}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "eval.json").write_text(json.dumps({
        w: {"accuracy": a, "stderr": 0.05, "problems": problems, "samples_per_problem": samples}
        for w, a in zip(("before", "after"), heldout)}))
    (path / "config.yaml").write_text(yaml.safe_dump({"method": method, "max_steps": 2, "seed": 0}))
    return path


@pytest.fixture()
def figures(monkeypatch):
    """Every figure `stapo.analyze.plots` renders, kept open for inspection."""
    kept = []

    def keep(fig):
        kept.append(fig)
        return b"\x89PNG"

    monkeypatch.setattr(plots, "_png", keep)
    yield kept
    plots._pyplot().close("all")


def _panels(fig) -> dict[str, object]:
    return {ax.get_title().replace("\n", " "): ax for ax in fig.axes if ax.axison}


def test_run_curves_png_is_readable(tmp_path, figures):
    from stapo.train import plot_runs

    run = _run(tmp_path / "demo", "stapo", masked=0.0004)
    assert plot_runs([run], run / "plots" / "curves.png") is not None
    (fig,) = figures
    panels = _panels(fig)
    titles = list(panels)
    # titles from the vocabulary, never a raw metric key; every panel has a y-axis label
    assert not RAW_KEYS & {t.split(",")[0].split(" (")[0] for t in titles}
    assert all(ax.get_ylabel() for ax in panels.values())
    assert "tokens silenced by S2T" in titles  # a stapo run: nothing about "non-stapo" or "would"
    # 0/1 rewards: the reward panel says it is the accuracy, no second panel repeats it
    assert any(t.startswith("training reward (= training accuracy") for t in titles)
    assert not any(t.startswith("training accuracy") for t in titles)
    # held-out accuracy: points with ± standard error, in %, and the evaluation's size in the title
    (held_title,) = [t for t in titles if t.startswith("held-out accuracy")]
    assert "avg@4 over 32 problems" in held_title and "standard error" in held_title
    held = panels[held_title]
    assert held.get_ylabel() == "accuracy (%)"
    assert held.containers and all(line.get_linestyle() == "None" for line in held.lines)
    xs, ys = held.containers[0].lines[0].get_data()
    assert np.allclose(ys, [20.0, 30.0]) and np.allclose(xs, [0, 2])
    bars = held.containers[0].lines[2][0].get_segments()  # the vertical error bars: ± 5 and ± 6 points
    assert [round(float(s[1][1] - s[0][1]), 6) for s in bars] == [10.0, 12.0]
    # a panel that is 0 at every step gets a range that shows it, not ±0.05 around 0
    clip = panels["clipped low (A < 0)"]
    assert clip.get_ylim() == (0.0, 1.0) and clip.get_ylabel() == "% of tokens with ratio < 1 − ε"
    # one legend for the figure, not one per panel
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) + len(fig.legends) == 1
    (legend,) = legends + fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["demo (stapo)"]


def test_compare_figure_names_methods_and_applied_s2t(tmp_path, figures):
    runs = load_runs([_run(tmp_path / "a" / "run", "grpo"), _run(tmp_path / "b" / "run", "stapo", masked=1e-4)])
    plots.curves_png(curve_panels(runs))
    panels = _panels(figures[-1])
    assert "tokens silenced by S2T (stapo) or that it would silence (the other methods: measured only)" in panels
    legend = (figures[-1].legends or [ax.get_legend() for ax in figures[-1].axes if ax.get_legend()])[0]
    assert [t.get_text() for t in legend.get_texts()] == ["a/run (grpo)", "b/run (stapo)"]
    # grpo alone: measured, not applied
    plots.curves_png(curve_panels(runs[:1]))
    assert "tokens S2T would silence (measured, not applied)" in _panels(figures[-1])


def test_heldout_of_different_sizes_is_said(tmp_path, figures, capsys):
    a = _run(tmp_path / "grpo", "grpo", problems=32, samples=4)
    b = _run(tmp_path / "stapo", "stapo", problems=64, samples=8)
    assert main(["analyze", "runs", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy measured differently: grpo: avg@4 over 32 problems; stapo: avg@8 over 64 problems" in out
    (held,) = [ax for t, ax in _panels(figures[-1]).items() if t.startswith("held-out accuracy")]
    assert "different sizes" in held.get_title().replace("\n", " ")
    assert [t.get_text() for t in held.get_legend().get_texts()] == [
        "grpo: avg@4 over 32 problems", "stapo: avg@8 over 64 problems"]
    html = (tmp_path / "out" / "runs.html").read_text()
    assert "measured differently" in html and "stapo analyze runs — grpo, stapo" in html


def test_groups_heldout_bars_are_min_max(tmp_path, figures):
    runs = load_runs([_run(tmp_path / "grpo-seed0", "grpo", heldout=(0.2, 0.3)),
                      _run(tmp_path / "grpo-seed1", "grpo", heldout=(0.4, 0.5))])
    plots.curves_png(curve_bands(group_runs(runs)), window=2)
    panels = _panels(figures[-1])
    (title,) = [t for t in panels if t.startswith("held-out accuracy")]
    assert "min..max over runs" in title and "moving average" not in title
    assert any(t.endswith("2-step moving average") for t in panels)
    bars = panels[title].containers[0].lines[2][0].get_segments()
    assert [(round(float(s[0][1]), 6), round(float(s[1][1]), 6)) for s in bars] == [(20.0, 40.0), (30.0, 50.0)]


def test_demo_compare_prints_its_table(tmp_path, monkeypatch, capsys, figures):
    import stapo.commands.train as train_cmd

    def fake_train(cfg, resume=False, overwrite=False):  # the runs' files, as training writes them
        out = Path(cfg.output_dir)
        _run(out, cfg.method, heldout=(0.2, 0.25 if cfg.method == "grpo" else 0.35),
             masked=1e-4 if cfg.method == "stapo" else 0.0)
        return 0

    monkeypatch.setattr(train_cmd, "train_from_config", fake_train)
    assert main(["demo", "--compare", "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    table = out.split("=== stapo ===", 1)[1]
    header = next(line for line in table.splitlines() if line.strip())
    assert header.split() == ["grpo", "stapo"]
    after = next(line for line in table.splitlines() if line.startswith("held-out accuracy (%), after training"))
    assert after.split()[-6:] == ["25.0", "±", "6.0", "35.0", "±", "6.0"]
    s2t = next(line for line in table.splitlines() if line.startswith("S2T in the loss"))
    assert s2t.split()[-3:] == ["measured", "only", "applied"]
    masked = next(line for line in table.splitlines() if "tokens silenced by S2T (% of tokens)" in line)
    assert masked.split()[-6:] == ["0", "→", "0", "0.01", "→", "0.02"]
    assert f"comparison plot: {tmp_path / 'cmp' / 'compare.png'}" in out
    titles = _panels(figures[-1])
    assert any(t.startswith("held-out accuracy, avg@4 over 32 problems") for t in titles)


def test_runs_html_of_a_stapo_run_says_silenced(tmp_path, figures, capsys):
    run = _run(tmp_path / "demo", "stapo", masked=1e-4)
    assert main(["analyze", "runs", str(run), "--out", str(tmp_path / "out")]) == 0
    html = (tmp_path / "out" / "runs.html").read_text()
    assert "tokens silenced by S2T (% of tokens)" in html and "stapo analyze runs — demo (stapo)" in html
    assert "non-stapo" not in html and "would" not in html
    assert "tokens silenced by S2T" in _panels(figures[-1])
