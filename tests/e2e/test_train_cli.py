"""`stapo train` end to end on a tiny random Qwen3 (real tokenizer): run directory, metrics, resume."""

import json

import pytest
import yaml
from tiny_demo_args import tiny_demo_args

from stapo.cli import main


@pytest.mark.slow
def test_train_one_step_then_resume(tiny_qwen3_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "demo", *tiny_demo_args(tiny_qwen3_dir, out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy:" in printed and str(out) in printed

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "stapo" and cfg["max_steps"] == 1 and cfg["model"] == str(tiny_qwen3_dir)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x["step"] for x in lines if "stapo/s2t_masked_frac" in x]
    assert steps == [1]
    first = next(x for x in lines if x["step"] == 1 and x["kind"] == "train")
    for key in ("stapo/s2t_masked_count", "stapo/s2t_masked_frac", "stapo/frac_low_prob", "stapo/frac_low_entropy",
                "entropy", "reward", "clip_ratio/low_mean", "clip_ratio/high_mean", "grad_norm", "learning_rate",
                "stapo/zero_variance_group_frac", "completions/mean_length", "step_time"):
        assert key in first, key
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) == {"before", "after"} and ev["before"]["problems"] == 2
    assert (out / "plots" / "curves.png").stat().st_size > 1000

    # --resume continues from checkpoint-1 to step 2; no metrics line is duplicated or lost
    assert main(["train", "demo", "--resume", *tiny_demo_args(tiny_qwen3_dir, out, max_steps=2)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x["step"] for x in lines if "stapo/s2t_masked_frac" in x]
    assert steps == [1, 2]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_train_bad_data_is_one_clear_error(tiny_qwen3_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "", "answer": "3"}\n')
    rc = main(["train", "demo", *tiny_demo_args(tiny_qwen3_dir, tmp_path / "run", train_data=str(bad))])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.jsonl" in err and "2" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_compare_trains_grpo_and_stapo_and_overlays_them(tiny_qwen3_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = tiny_demo_args(tiny_qwen3_dir, out, eval_before="false", eval_after="false")
    assert main(["demo", "--compare", *[a for a in args if not a.startswith("output_dir=")], "--out", str(out)]) == 0
    assert "comparison plot:" in capsys.readouterr().out
    for method in ("grpo", "stapo"):
        cfg = yaml.safe_load((out / method / "config.yaml").read_text())
        assert cfg["method"] == method and cfg["seed"] == 0
        assert (out / method / "metrics.jsonl").stat().st_size > 0
    assert (out / "compare.png").stat().st_size > 1000
