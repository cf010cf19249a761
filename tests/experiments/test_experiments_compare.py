"""experiments/compare/run.py: the small-scale STAPO vs baselines sweep and its report.

Aggregation is checked on hand-written run directories with hand-worked expected numbers; the
sweep itself runs end to end (`--quick`) on a tiny random Qwen3.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stapo.core import get_preset

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "compare" / "run.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("experiments_compare_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _run_script(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


# --------------------------------------------------------------- report from hand-written runs


def _fake_run(root: Path, method: str, seed: int, entropy, masked, before, after, eval_points=()):
    """A run directory as `stapo train` writes it (the files the report reads)."""
    d = root / "runs" / f"{method}-seed{seed}"
    d.mkdir(parents=True)
    lines = []
    for step, (h, f) in enumerate(zip(entropy, masked), 1):
        lines.append({"step": step, "kind": "train", "entropy": h, "stapo/s2t_masked_frac": f,
                      "stapo/s2t_masked_count": f * 100, "stapo/entropy_threshold": 0.5, "reward": 0.25 * seed,
                      "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.01, "completions/mean_length": 20.0})
    for step, acc in eval_points:
        lines.append({"step": step, "kind": "eval", "eval_heldout_accuracy": acc})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "eval.json").write_text(json.dumps({
        "before": {"accuracy": before, "stderr": 0.01, "problems": 20, "samples_per_problem": 8},
        "after": {"accuracy": after, "stderr": 0.02, "problems": 20, "samples_per_problem": 8},
    }))
    cfg = {"model": "embedded", "method": method, "seed": seed, "max_steps": len(entropy)}
    if method == "stapo":
        cfg.update(tau_p=0.02, tau_h=None, tau_h_quantile=None)  # tau_h_quantile null: the preset's
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "summary.json").write_text(json.dumps({"method": method}))
    (d / "sweep_run.json").write_text(json.dumps({"method": method, "seed": seed, "wall_s": 10.0 + seed,
                                                  "completed": True}))
    return d


def test_report_from_runs_hand_worked(compare, tmp_path):
    _fake_run(tmp_path, "grpo", 0, [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.1, 0.1], 0.2, 0.3, [(2, 0.25)])
    _fake_run(tmp_path, "grpo", 1, [3.0, 4.0, 5.0, 6.0], [0.1, 0.1, 0.2, 0.2], 0.2, 0.5, [(2, 0.35)])
    _fake_run(tmp_path, "stapo", 0, [1.0, 1.0, 1.0, 1.0], [0.02, 0.04, 0.06, 0.08], 0.2, 0.6)
    _fake_run(tmp_path, "stapo", 1, [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], 0.1, 0.4)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "embedded", "max_steps": 4}))
    report, results = compare.build_report(tmp_path, ["run.py"], ["grpo", "stapo"], [0, 1], window=1,
                                           log=lambda s: None)
    s = results["summary"]
    assert s["grpo"]["heldout_after"]["mean"] == pytest.approx(0.4)
    assert (s["grpo"]["heldout_after"]["min"], s["grpo"]["heldout_after"]["max"]) == (0.3, 0.5)
    assert s["stapo"]["heldout_after"]["mean"] == pytest.approx(0.5)
    assert s["stapo"]["heldout_before"]["mean"] == pytest.approx(0.15)
    # masked fraction: per run mean over steps, then mean over seeds: stapo (0.05 + 0) / 2, grpo (0.05 + 0.15) / 2
    assert s["stapo"]["s2t_masked_frac"]["all"]["mean"] == pytest.approx(0.025)
    assert s["grpo"]["s2t_masked_frac"]["all"]["mean"] == pytest.approx(0.10)
    # masked tokens in the run: sum of the per-step counts (100 x frac): stapo seed 0: 2+4+6+8 = 20, seed 1: 0
    assert s["stapo"]["s2t_masked_total"]["values"] == pytest.approx([20.0, 0.0])
    # entropy: first / last 10% of 4 steps = the first / last step; grpo seeds 1 and 3 -> mean 2, 4 and 6 -> 5
    assert s["grpo"]["entropy"]["first10"]["mean"] == pytest.approx(2.0)
    assert s["grpo"]["entropy"]["last10"]["mean"] == pytest.approx(5.0)
    preset = get_preset("stapo").s2t_settings  # tau_h_quantile null in the run's config: the preset's
    assert results["s2t_thresholds"] == {"tau_p": 0.02, "tau_h": None, "tau_h_quantile": preset.tau_h_quantile,
                                         "tau_h_population": preset.tau_h_population,
                                         "tau_h_max": preset.tau_h_max}
    assert results["total_run_wall_s"] == pytest.approx(4 * 10.0 + 2 * 1.0)
    text = report.read_text()
    table = text.split("## Held-out accuracy", 1)[1].split("##", 1)[0]
    assert "| grpo | 2 | 0.200 [0.200, 0.200] | 0.400 [0.300, 0.500] | 0.200 [0.100, 0.300] |" in table
    assert "| stapo | 2 | 0.150 [0.100, 0.200] | 0.500 [0.400, 0.600] |" in table
    assert "tau_p = 0.02" in text and f"{preset.tau_h_quantile:g} quantile" in text
    for name in ("heldout_accuracy", "reward", "entropy", "s2t_masked_frac", "clip_low", "clip_high",
                 "response_length", "overview"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (tmp_path / "plots" / "accuracy.png").exists()  # no run logged training accuracy
    html = (tmp_path / "analyze" / "runs.html").read_text()
    assert "grpo-seed0" in html and "groups (runs named" not in html  # a line per run (--no-group)
    assert "![overview](plots/overview.png)" in text and "[analyze/runs.html](analyze/runs.html)" in text
    # the held-out curve (stapo.analyze.runs): step 0 = before, the eval_every point, the last step = after
    from stapo.analyze.runs import load_run

    _, steps, values = load_run(tmp_path / "runs" / "grpo-seed0").curves["heldout_accuracy"]
    assert steps.tolist() == [0, 2, 4] and values.tolist() == [0.2, 0.25, 0.3]
    assert results["summary"]["grpo"]["heldout_after_stderr"] == [0.02, 0.02]
    # stapo is the run that applies S2T; the other methods only log it
    assert "| stapo (applied) |" in text and "| grpo (diagnostic) |" in text


def test_report_bands_are_the_mean_min_max_over_seeds(compare, tmp_path, monkeypatch):
    """The figures get, per curve and method, the mean / min / max over seeds at the steps every seed
    logged, smoothed per seed (hand-worked), and held-out accuracy unsmoothed."""
    _fake_run(tmp_path, "grpo", 0, [1.0, 2.0, 3.0, 4.0], [0.0] * 4, 0.2, 0.3, [(2, 0.25)])
    _fake_run(tmp_path, "grpo", 1, [3.0, 4.0, 5.0, 6.0], [0.0] * 4, 0.2, 0.5, [(2, 0.35)])
    _fake_run(tmp_path, "stapo", 0, [1.0, 1.0, 1.0], [0.0] * 3, 0.1, 0.4)
    seen = {}

    def fake_write_figures(bands, plots_dir, window):
        seen.update(bands=bands, window=window)
        return []

    monkeypatch.setattr(compare, "write_figures", fake_write_figures)
    compare.build_report(tmp_path, ["run.py"], ["grpo", "stapo"], [0, 1], window=2, log=lambda s: None, html=False)
    assert seen["window"] == 2
    ent = seen["bands"]["entropy"]["grpo"]
    # smoothed over 2 steps: seed 0 -> 1, 1.5, 2.5, 3.5; seed 1 -> 3, 3.5, 4.5, 5.5
    assert ent.n == 2 and ent.steps.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(ent.mean, [2.0, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(ent.lo, [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(ent.hi, [3.0, 3.5, 4.5, 5.5])
    assert seen["bands"]["entropy"]["stapo"].n == 1  # the missing stapo seed 1 is not in the band
    held = seen["bands"]["heldout_accuracy"]["grpo"]
    assert held.steps.tolist() == [0, 2, 4]
    np.testing.assert_allclose(held.mean, [0.2, 0.3, 0.4])
    np.testing.assert_allclose(held.lo, [0.2, 0.25, 0.3])
    np.testing.assert_allclose(held.hi, [0.2, 0.35, 0.5])


def test_report_only_on_a_finished_sweep(compare, tmp_path):
    """--report-only over a sweep directory: the report, results, figures and HTML from its runs alone."""
    _fake_run(tmp_path, "grpo", 0, [1.0, 2.0, 3.0], [0.0, 0.1, 0.0], 0.2, 0.3)
    _fake_run(tmp_path, "grpo", 1, [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], 0.2, 0.5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "embedded", "max_steps": 3}))
    (tmp_path / "sweep.json").write_text(json.dumps({"command": "python experiments/compare/run.py", "wall_s": 60.0}))
    assert compare.main(["--report-only", "--methods", "grpo", "--seeds", "0,1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sweep_wall_s"] == 60.0 and results["missing_runs"] == []
    assert results["summary"]["grpo"]["heldout_after"]["values"] == [0.3, 0.5]
    assert results["smoothing_window"] == 1  # 3 steps // 10, at least 1
    for name in ("report.md", "plots/overview.png", "plots/entropy.png", "analyze/runs.html"):
        assert (tmp_path / name).is_file(), name


def test_report_lists_missing_runs(compare, tmp_path):
    _fake_run(tmp_path, "grpo", 0, [1.0, 2.0], [0.0, 0.0], 0.2, 0.3)
    _, results = compare.build_report(tmp_path, ["run.py"], ["grpo", "stapo"], [0], window=1, log=lambda s: None,
                                      html=False)
    assert results["missing_runs"] == ["stapo-seed0"]
    assert "**Missing or failed runs**" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--methods", "grpo,ppo"], "unknown method 'ppo'"),
        (["--seeds", "0,x"], "--seeds: 'x'"),
        (["--seeds", "1,1"], "duplicate"),
        (["--set", "method=grpo"], "'method' is set per run"),
        (["--set", "novalue"], "key=value"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--jobs", "0"], "--jobs must be >= 1"),
    ],
)
def test_bad_arguments_one_clear_error(compare, tmp_path, capsys, args, needle):
    assert compare.main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_report_only_without_runs(compare, tmp_path, capsys):
    assert compare.main(["--report-only", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_methods_differ_only_in_method(compare, tmp_path):
    """The resolved run configs of the sweep (base.yaml as shipped) differ only in method and output_dir;
    the stapo-former variant is the stapo preset with the former S2T reading, nothing else."""
    from stapo.config import load_config

    cfg = compare.shared_config(compare.build_parser().parse_args([]))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    flats = {m: load_config(path, compare.run_overrides(tmp_path, m, 0)).to_flat_dict() for m in compare.METHODS}
    for m, flat in flats.items():
        diff = {k for k in set(flat) | set(flats["stapo"]) if flat.get(k) != flats["stapo"].get(k)}
        if m == "stapo-former":
            assert diff <= {"output_dir", "tau_p", "tau_h_quantile", "tau_h_max"}, diff
            assert (flat["tau_p"], flat["tau_h_quantile"], flat["tau_h_max"]) == (
                0.01, 0.05, pytest.approx(math.log(2)))
            continue
        assert diff <= {"method", "output_dir"}, (m, diff)
        assert flat["seed"] == 0 and flat["method"] == m
    # off-policy second step: without it the clip range never acts and grpo == justrl exactly
    assert flats["stapo"]["steps_per_generation"] > flats["stapo"]["gradient_accumulation_steps"]


def test_changed_shared_config_refuses_to_mix(compare, tmp_path, capsys):
    _fake_run(tmp_path, "grpo", 0, [1.0], [0.0], 0.2, 0.3)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "something-else"}))
    assert compare.main(["--methods", "grpo", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "different shared config" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_quick_sweep_end_to_end(compare, tiny_qwen3_dir, tmp_path):
    out = tmp_path / "quick"
    # two runs at a time, each single-threaded (the way the full sweep is run on a 2-core machine)
    proc = _run_script("--quick", "--model", tiny_qwen3_dir, "--out", out, "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for m in ("grpo", "20-entropy", "justrl", "stapo", "stapo-former"):
        info = json.loads((out / "runs" / f"{m}-seed0" / "sweep_run.json").read_text())
        assert info["completed"] and info["threads"] == str(max(1, (os.cpu_count() or 1) // 2))
    for name in ("report.md", "results.json", "config.yaml", "analyze/runs.html", "plots/overview.png",
                 "plots/entropy.png", "plots/heldout_accuracy.png", "plots/s2t_masked_frac.png"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    table = text.split("## Held-out accuracy", 1)[1].split("##", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["grpo", "20-entropy", "justrl", "stapo", "stapo-former"]
    results = json.loads((out / "results.json").read_text())
    assert results["missing_runs"] == []
    # each run's resolved config differs from the others only in method / output_dir
    flats = {m: yaml.safe_load((out / "runs" / f"{m}-seed0" / "config.yaml").read_text())
             for m in compare.METHODS}
    for m, flat in flats.items():
        preset, extra = compare.VARIANTS.get(m, (m, {}))
        assert flat["max_steps"] == 2 and flat["method"] == preset
        assert {k for k in flat if flat[k] != flats["grpo"].get(k)} <= {"method", "output_dir", *extra}
        metrics = [json.loads(x) for x in (out / "runs" / f"{m}-seed0" / "metrics.jsonl").read_text().splitlines()]
        assert {x["step"] for x in metrics if "entropy" in x} == {1, 2}
        # the in-training evaluation (step 1) is a line of its own; the step's training line survives it
        assert [x["step"] for x in metrics if x["kind"] == "train" and "loss" in x] == [1, 2]
        evals = [x for x in metrics if x["kind"] == "eval"]
        # held-out accuracy before training (step 0), at eval_every (step 1) and after the last step (2)
        assert [x["step"] for x in evals] == [0, 1, 2]
        assert all("loss" not in x and "entropy" not in x for x in evals)
    # resumable: a second invocation skips the completed runs and rewrites only the report
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    again = _run_script("--quick", "--model", tiny_qwen3_dir, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already complete, skipped") == len(compare.METHODS)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # --report-only keeps the sweep's own command and wall time in the report
    sweep = json.loads((out / "sweep.json").read_text())
    assert "--quick" in sweep["command"] and sweep["wall_s"] > 0
    regen = _run_script("--report-only", "--seeds", "0", "--out", out)
    assert regen.returncode == 0, regen.stderr[-2000:]
    what = (out / "report.md").read_text().split("## What was run", 1)[1].split("Methods:", 1)[0]
    assert sweep["command"] in what and "regenerated from the finished runs by" in what and "--report-only" in what
    assert json.loads((out / "results.json").read_text())["sweep_wall_s"] == sweep["wall_s"]


@pytest.mark.slow
def test_failed_run_is_recorded_and_reported(tmp_path):
    out = tmp_path / "fail"
    proc = _run_script("--quick", "--methods", "grpo", "--model", tmp_path / "no-such-model", "--out", out,
                       timeout=300)
    assert proc.returncode == 1
    assert "every run failed: grpo-seed0" in proc.stderr
    info = json.loads((out / "runs" / "grpo-seed0" / "sweep_run.json").read_text())
    assert info["completed"] is False and info["returncode"] != 0
    assert "no-such-model" in (out / "runs" / "grpo-seed0" / "train.log").read_text()


# ------------------------------------------------------------------------------ GPU launch scripts


GPU_DIR = ROOT / "experiments" / "compare" / "gpu"


def _bash(script, *args, **env):
    full_env = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(GPU_DIR / script), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=full_env)


def test_trl_8gpu_has_a_preset_per_method():
    from stapo.config import find_config

    for method in ("grpo", "20-entropy", "justrl", "stapo"):
        assert find_config(f"paper/qwen3-1.7b-{method}").is_file()


@pytest.mark.parametrize("method", ["grpo", "stapo"])  # the script is the same for every method
def test_trl_8gpu_dry_run_command(method):
    # use_vllm=false: the dry run checks that the packages a run needs import, and this test venv has no
    # vLLM (its own venv, .venv-vllm); without the override the script stops there (tested below)
    proc = _bash("run_trl_8gpu.sh", method, "max_steps=3", "use_vllm=false", DRY_RUN="1", SEED="1")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[:2] == ["accelerate", "launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert Path(cmd[cmd.index("--config_file") + 1]).is_file()
    assert cmd[cmd.index("-m") + 1 : cmd.index("-m") + 4] == ["stapo", "train", f"paper/qwen3-1.7b-{method}"]
    assert f"output_dir=runs/compare-gpu/{method}-seed1" in cmd and "seed=1" in cmd and "max_steps=3" in cmd


def test_trl_8gpu_dry_run_refuses_without_vllm():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable here")
    proc = _bash("run_trl_8gpu.sh", "stapo", DRY_RUN="1")
    assert proc.returncode != 0 and "use_vllm: vLLM is not importable" in proc.stderr
    assert "accelerate" not in proc.stdout


def test_trl_8gpu_refuses_bad_method_and_bad_override():
    proc = _bash("run_trl_8gpu.sh", "ppo", DRY_RUN="1")
    assert proc.returncode == 2 and "unknown method 'ppo'" in proc.stderr
    proc = _bash("run_trl_8gpu.sh", "grpo", "tau_p=5", DRY_RUN="1")  # out of range: refused before launch
    assert proc.returncode != 0 and "tau_p" in proc.stderr and "accelerate" not in proc.stdout


def test_verl_dry_run_uses_the_recipe():
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    proc = _bash("run_verl.sh", "stapo", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert "stapo.engines.verl.main" in proc.stdout.splitlines()[0]
    assert "qwen3-1.7b" in proc.stdout.lower() or "Qwen3-1.7B" in proc.stdout
    assert _bash("run_verl.sh", "ppo").returncode == 2


def test_run_sweep_with_jobs_keeps_sweep_order(compare, tmp_path, monkeypatch):
    """--jobs N: every run trained once, with cores // N threads, records returned in sweep order."""
    import random
    import threading
    import time as _time

    calls, lock = [], threading.Lock()

    def fake_train_one(config_path, out, method, seed, log=print, threads=None):
        _time.sleep(random.uniform(0, 0.02))  # finish out of order
        with lock:
            calls.append((method, seed, threads))
        return {"method": method, "seed": seed, "completed": True, "wall_s": 0.0}

    monkeypatch.setattr(compare, "train_one", fake_train_one)
    records = compare.run_sweep(tmp_path / "c.yaml", tmp_path, ["grpo", "stapo"], [0, 1], log=lambda s: None, jobs=2)
    assert [(r["method"], r["seed"]) for r in records] == [("grpo", 0), ("stapo", 0), ("grpo", 1), ("stapo", 1)]
    assert sorted(c[:2] for c in calls) == sorted((m, s) for m in ("grpo", "stapo") for s in (0, 1))
    assert {c[2] for c in calls} == {max(1, (os.cpu_count() or 1) // 2)}
    assert compare.threads_per_job(1) is None
