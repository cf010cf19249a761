"""`stapo analyze runs`: metrics.jsonl parsing, curve-name candidates, overlays, groups of seeds (mean,
min, max over the runs, checked against hand-worked numbers), clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stapo.analyze.runs import (
    RunError,
    aggregate,
    config_differences,
    curve_bands,
    curve_panels,
    entropy_stability,
    fmt_spread,
    format_runs_table,
    group_notes,
    group_runs,
    group_summary,
    load_run,
    load_runs,
    moving_average,
    split_seed,
    spread,
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
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text('{"step": 1, "reward": 1}\n{oops\n')),
         "line 2 is not valid JSON"),
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


# ------------------------------------------------------------------------------ groups of seeds


def test_moving_average_hand_worked():
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(moving_average(np.array([4.0, 0.0, 2.0, 6.0]), 3), [4.0, 2.0, 2.0, 8.0 / 3.0])
    np.testing.assert_allclose(moving_average(np.array([1.0, 9.0]), 1), [1.0, 9.0])


def test_aggregate_over_runs_uses_common_steps():
    a = (np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]))
    b = (np.array([1, 2, 3, 4]), np.array([3.0, 4.0, 5.0, 6.0]))  # step 4 only in one run: dropped
    band = aggregate([a, b])
    np.testing.assert_array_equal(band.steps, [1, 2, 3])
    np.testing.assert_allclose(band.mean, [2.0, 3.0, 4.0])
    np.testing.assert_allclose(band.lo, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(band.hi, [3.0, 4.0, 5.0])
    assert band.n == 2
    # smoothing happens per run before aggregation: a -> [1, 1.5, 2.5], b -> [3, 3.5, 4.5, 5.5]
    band = aggregate([a, b], window=2)
    np.testing.assert_allclose(band.mean, [2.0, 2.5, 3.5])
    np.testing.assert_allclose(band.lo, [1.0, 1.5, 2.5])
    assert aggregate([]) is None
    assert aggregate([(np.array([1]), np.array([1.0])), (np.array([2]), np.array([1.0]))]) is None


def test_spread_hand_worked():
    s = spread([0.2, 0.4, 0.9])
    assert s["mean"] == pytest.approx(0.5) and s["min"] == 0.2 and s["max"] == 0.9 and s["n"] == 3
    assert s["std"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5)
    assert spread([0.3])["std"] == 0.0
    assert fmt_spread(s) == "0.500 [0.200, 0.900]"
    assert fmt_spread(spread([0.25])) == "0.250" and fmt_spread(None) == "—"
    assert fmt_spread(spread([0.001, 0.003]), 2, pct=True) == "0.20 [0.10, 0.30]"


def test_split_seed_and_group_runs(tmp_path):
    assert split_seed("grpo-seed12") == ("grpo", 12)
    assert split_seed("stapo-former_seed0") == ("stapo-former", 0)
    assert split_seed("grpo") == ("grpo", None) and split_seed("seed3") == ("seed3", None)
    assert split_seed("grpo-seed1x") == ("grpo-seed1x", None)
    runs = load_runs([_write_run(tmp_path / n, _trl_rows(3)) for n in ("grpo-seed0", "stapo-seed0", "grpo-seed1", "x")])
    groups = group_runs(runs)
    assert {k: [r.name for r in v] for k, v in groups.items()} == {
        "grpo": ["grpo-seed0", "grpo-seed1"], "stapo": ["stapo-seed0"], "x": ["x"]}
    assert [r.seed for r in groups["grpo"]] == [0, 1] and groups["x"][0].seed is None
    assert list(group_runs(runs, by_seed=False)) == ["grpo-seed0", "stapo-seed0", "grpo-seed1", "x"]


def _seed_run(root, name, seed, entropy, heldout, before=None, after=None, config=None):
    """A run with an entropy curve at steps 1.. and held-out points {step: accuracy}; optional eval.json."""
    rows = [{"step": s, "kind": "train", "entropy": h} for s, h in enumerate(entropy, 1)]
    rows += [{"step": s, "kind": "eval", "eval_heldout_accuracy": a} for s, a in heldout.items()]
    d = _write_run(root / name, rows, {"seed": seed, "output_dir": str(root / name), "learning_rate": 1e-5,
                                       "max_steps": len(entropy), **(config or {})})
    if before is not None or after is not None:
        ev = {w: {"accuracy": a, "stderr": 0.1} for w, a in (("before", before), ("after", after)) if a is not None}
        (d / "eval.json").write_text(json.dumps(ev))
    return d


def test_heldout_curve_completed_from_eval_json(tmp_path):
    d = _seed_run(tmp_path, "r", 0, [1.0, 1.0, 1.0, 1.0], {2: 0.4}, before=0.1, after=0.7)
    key, steps, values = load_run(d).curves["heldout_accuracy"]
    assert key == "eval_heldout_accuracy" and steps.tolist() == [0, 2, 4] and values.tolist() == [0.1, 0.4, 0.7]
    # metrics.jsonl's own points win over eval.json
    d = _seed_run(tmp_path, "s", 0, [1.0, 1.0], {0: 0.2, 2: 0.6}, before=0.9, after=0.9)
    assert load_run(d).curves["heldout_accuracy"][2].tolist() == [0.2, 0.6]
    # eval.json only: its two points
    d = _seed_run(tmp_path, "t", 0, [1.0, 1.0, 1.0], {}, before=0.3, after=0.5)
    key, steps, values = load_run(d).curves["heldout_accuracy"]
    assert key == "eval.json" and steps.tolist() == [0, 3] and values.tolist() == [0.3, 0.5]


def test_group_bands_and_summary_hand_worked(tmp_path):
    runs = load_runs([
        _seed_run(tmp_path, "grpo-seed0", 0, [1.0, 3.0, 5.0, 7.0], {0: 0.2, 2: 0.3, 4: 0.5}),
        _seed_run(tmp_path, "grpo-seed1", 1, [2.0, 2.0, 2.0], {0: 0.4, 2: 0.5}, after=0.9),  # 3 steps, eval.json
        _seed_run(tmp_path, "grpo-seed2", 2, [3.0, 1.0, 2.0, 0.0, 9.0], {0: 0.0, 2: 0.1, 4: 0.7}),
        _seed_run(tmp_path, "stapo-seed0", 0, [4.0, 4.0], {2: 0.8}),
    ])
    groups = group_runs(runs)
    bands = curve_bands(groups)
    ent = bands["entropy"]["grpo"]
    # steps all three logged: 1..3; per step mean / min / max of (1, 2, 3), (3, 2, 1), (5, 2, 2)
    assert ent.n == 3 and ent.steps.tolist() == [1, 2, 3]
    np.testing.assert_allclose(ent.mean, [2.0, 2.0, 3.0])
    np.testing.assert_allclose(ent.lo, [1.0, 1.0, 2.0])
    np.testing.assert_allclose(ent.hi, [3.0, 3.0, 5.0])
    # smoothing over 2 steps, per run, before the mean: (1, 2, 4), (2, 2, 2), (3, 2, 1.5)
    sm = curve_bands(groups, window=2)
    np.testing.assert_allclose(sm["entropy"]["grpo"].mean, [2.0, 2.0, 7.5 / 3])
    np.testing.assert_allclose(sm["entropy"]["grpo"].hi, [3.0, 2.0, 4.0])
    # held-out accuracy is never smoothed; seed 1's eval.json "after" is its step 3, which the others lack
    held = sm["heldout_accuracy"]["grpo"]
    assert held.steps.tolist() == [0, 2]
    np.testing.assert_allclose(held.mean, [0.2, 0.3])
    np.testing.assert_allclose(held.lo, [0.0, 0.1])
    np.testing.assert_allclose(held.hi, [0.4, 0.5])
    assert bands["entropy"]["stapo"].n == 1
    summary = group_summary(groups)
    g = summary["grpo"]
    assert g["runs"] == ["grpo-seed0", "grpo-seed1", "grpo-seed2"] and g["seeds"] == [0, 1, 2]
    # before: step 0 of each run; after: each run's last point (0.5, 0.9 from eval.json, 0.7)
    assert g["heldout_before"]["values"] == pytest.approx([0.2, 0.4, 0.0])
    assert g["heldout_after"]["values"] == pytest.approx([0.5, 0.9, 0.7])
    assert g["heldout_after"]["mean"] == pytest.approx(0.7) and g["heldout_after"]["std"] == pytest.approx(0.2)
    assert "heldout_before" not in summary["stapo"]  # no point at step 0
    assert summary["stapo"]["heldout_after"]["values"] == [0.8]


def test_group_notes_when_configs_differ_beyond_the_seed(tmp_path):
    runs = load_runs([_seed_run(tmp_path, "a-seed0", 0, [1.0], {}),
                      _seed_run(tmp_path, "a-seed1", 1, [1.0], {}, config={"learning_rate": 3e-5}),
                      _seed_run(tmp_path, "b-seed0", 0, [1.0], {}), _seed_run(tmp_path, "b-seed1", 1, [1.0], {})])
    assert group_notes(group_runs(runs)) == [
        "group 'a': its runs' configs differ in more than the seed: learning_rate"]


def test_cli_runs_groups_seeds(tmp_path, capsys):
    from matplotlib.image import imread

    dirs = [_seed_run(tmp_path, "grpo-seed0", 0, [1.0, 2.0], {0: 0.2, 2: 0.3}),
            _seed_run(tmp_path, "grpo-seed1", 1, [3.0, 4.0], {0: 0.4, 2: 0.6}),
            _seed_run(tmp_path, "stapo-seed0", 0, [1.0, 1.0], {0: 0.2, 2: 0.5})]
    out = tmp_path / "out"
    assert main(["analyze", "runs", *map(str, dirs), "--out", str(out), "--smooth", "2"]) == 0
    text = capsys.readouterr().out
    table = text.split("groups (runs named", 1)[1].splitlines()
    assert table[1].split() == ["group", "runs", "seeds", "held-out", "before", "held-out", "after", "after", "std"]
    assert table[2].split() == ["grpo", "2", "0,1", "0.300", "[0.200,", "0.400]", "0.450", "[0.300,", "0.600]", "0.212"]
    assert table[3].split() == ["stapo", "1", "0", "0.200", "0.500", "—"]
    html = (out / "runs.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "groups (runs named" in html
    img = imread(out / "curves.png")
    assert img.shape[0] > 300 and float(img[..., :3].std()) > 0.05
    # --no-group: a line per run, no group table
    assert main(["analyze", "runs", *map(str, dirs), "--out", str(tmp_path / "o2"), "--no-group"]) == 0
    assert "groups (runs named" not in capsys.readouterr().out
    assert main(["analyze", "runs", str(dirs[0]), "--out", str(tmp_path / "o3"), "--smooth", "0"]) == 2
    assert "--smooth must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the run's config.yaml


@pytest.mark.parametrize("text, says", [
    ("method: [stapo\n", "not valid YAML at line"),
    ("- method\n- stapo\n", "expected a mapping of config fields"),
    (b"\xff\xfe bad bytes", "cannot be read"),
])
def test_corrupt_config_is_a_named_error(tmp_path, capsys, text, says):
    run = _write_run(tmp_path / "run", _trl_rows(2))
    cfg = run / "config.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    # `stapo analyze runs`: one line naming the file, exit 2 (never read as an empty config)
    assert main(["analyze", "runs", str(run), "--out", str(tmp_path / "o")]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and str(cfg) in line and says in line
    # `stapo analyze tokens --run`: the same error
    assert main(["analyze", "tokens", "--run", str(run), "--out", str(tmp_path / "t")]) == 2
    line = capsys.readouterr().err.strip()
    assert str(cfg) in line and says in line
    # the one reader of a run's config (stapo.rundir)
    from stapo.rundir import RunDirError, read_run_config

    with pytest.raises(RunDirError, match=says) as err:
        read_run_config(run)
    assert str(cfg) in str(err.value)


def test_run_config_reader(tmp_path):
    from stapo.rundir import read_run_config

    assert read_run_config(tmp_path) == {}  # no config.yaml: a run without one (verl, hand-made)
    (tmp_path / "config.yaml").write_text("")
    assert read_run_config(tmp_path) == {}
    (tmp_path / "config.yaml").write_text("method: stapo\nseed: 3\n")
    assert read_run_config(tmp_path) == {"method": "stapo", "seed": 3}
