"""`stapo analyze runs`: metrics.jsonl parsing, curve-name candidates, overlays, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stapo.analyze.runs import (
    RunError,
    config_differences,
    curve_panels,
    entropy_stability,
    format_runs_table,
    load_run,
    load_runs,
)
from stapo.cli import main


def _write_run(path, rows, config=None):
    path.mkdir(parents=True, exist_ok=True)
    with (path / "metrics.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if config is not None:
        (path / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
    return path


def _trl_rows(n=8, spike_at=None):
    rows = []
    for s in range(1, n + 1):
        ent = 0.5 if s != spike_at else 2.0
        rows.append({"step": s, "reward": 0.1 * s, "entropy": ent, "stapo/s2t_masked_frac": 1e-4,
                     "clip_ratio/low_mean": 0.01, "clip_ratio/high_mean": 0.02,
                     "completions/mean_length": 30 + s, "learning_rate": 1e-5, "kind": "train",
                     "stapo/accuracy": 0.05 * s})
    # the engine's end-of-training line: totals, not a step
    rows.append({"step": n, "kind": "summary", "train_runtime": 9.0, "reward": 99.0})
    return rows


def test_trl_names_and_curves(tmp_path):
    run = load_run(_write_run(tmp_path / "stapo", _trl_rows(spike_at=5)))
    assert set(run.curves) == {"reward", "entropy", "s2t_masked_frac", "clip_low", "clip_high", "response_length",
                               "accuracy"}
    key, steps, values = run.curves["reward"]
    assert key == "reward" and steps.tolist() == list(range(1, 9))
    np.testing.assert_allclose(values, [0.1 * s for s in range(1, 9)])  # the summary line is skipped
    assert run.curves["accuracy"][0] == "stapo/accuracy"
    st = entropy_stability(run)
    assert (st.max, st.max_step) == (2.0, 5) and st.spike_ratio == pytest.approx(4.0)
    assert st.start == pytest.approx(0.5) and st.end == pytest.approx(0.5)


def test_verl_names_prefixes_and_duplicate_steps(tmp_path):
    rows = [{"step": 1, "critic/score/mean": 0.2, "actor/entropy": 1.0, "response_length/mean": 10},
            {"step": 2, "train/critic/score/mean": 0.3, "actor/entropy": 0.9},
            {"step": 2, "critic/score/mean": 0.4},  # a later line for a step wins
            {"step": 3, "critic/score/mean": float("nan"), "actor/entropy": 0.8}]
    run = load_run(_write_run(tmp_path / "v", rows))
    assert run.curves["reward"][0] == "critic/score/mean"
    assert run.curves["reward"][1].tolist() == [1, 2] and run.curves["reward"][2].tolist() == [0.2, 0.4]
    assert run.curves["entropy"][2].tolist() == [1.0, 0.9, 0.8]
    assert "s2t_masked_frac" not in run.curves


def test_trl_per_function_reward_fallback(tmp_path):
    run = load_run(_write_run(tmp_path / "r", [{"step": 1, "rewards/math_reward/mean": 0.25}]))
    assert run.curves["reward"][0] == "rewards/math_reward/mean"


def test_overlay_panels_png_and_table(tmp_path):
    from matplotlib.image import imread

    from stapo.analyze.plots import curves_png

    a = _write_run(tmp_path / "a" / "run", _trl_rows(), {"model": "embedded", "method": "grpo"})
    b = _write_run(tmp_path / "b" / "run", _trl_rows(6, spike_at=3), {"model": "other", "method": "stapo"})
    runs = load_runs([a, b])
    assert [r.name for r in runs] == ["a/run", "b/run"]  # same basename: parent/name
    panels = curve_panels(runs)
    assert set(panels["entropy"]) == {"a/run", "b/run"}
    assert config_differences(runs) == ["runs differ in 'model': a/run=embedded, b/run=other"]
    table = format_runs_table(runs)
    assert "entropy: start 0.5, end 0.5, max 2 at step 3" in table
    png = tmp_path / "c.png"
    png.write_bytes(curves_png(panels))
    img = imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 600 and float(img[..., :3].std()) > 0.05


def test_cli_runs_writes_plots_and_report(tmp_path, capsys):
    a = _write_run(tmp_path / "grpo", _trl_rows())
    b = _write_run(tmp_path / "stapo", _trl_rows())
    out = tmp_path / "out"
    assert main(["analyze", "runs", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "grpo" in text and "stapo" in text and "report:" in text
    html = (out / "runs.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "grpo, stapo" in html


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "no such run directory"),
        (lambda p: p.mkdir(), "no metrics.jsonl"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("")), "no logged metrics"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text('{"step": 1, "reward": 1}\n{oops\n')), "line 2 is not valid JSON"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text('{"reward": 1}\n')), "line 1 has no numeric 'step'"),
        (lambda p: _write_run(p, [{"step": 1, "foo": 1.0}]), "none of the known curves"),
    ],
)
def test_bad_run_dirs(tmp_path, capsys, setup, match):
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(RunError, match=match):
        load_runs([run])
    # the CLI prints one line, no traceback, exit code 2
    assert main(["analyze", "runs", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stapo analyze: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_mismatched_runs(tmp_path):
    a = _write_run(tmp_path / "a", [{"step": 1, "reward": 0.5}])
    b = _write_run(tmp_path / "b", [{"step": 1, "actor/entropy": 0.5}])
    with pytest.raises(RunError, match="no curve in common.*a: reward; b: entropy"):
        load_runs([a, b])
    with pytest.raises(RunError, match="given twice"):
        load_runs([a, tmp_path / "a"])
    with pytest.raises(RunError, match="not a directory"):
        load_runs([a / "metrics.jsonl"])
