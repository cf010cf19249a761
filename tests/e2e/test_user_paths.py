"""The paths the README and docs send a user down: flags that exist, errors that name the way out,
eval tables in the papers' convention, options that are not silently ignored, one vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stapo.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------- repository paths


@pytest.mark.parametrize("rel", ["configs/demo.yaml", "configs/accelerate/fsdp.yaml",
                                 "configs/paper/qwen3-1.7b-stapo.yaml"])
def test_readme_config_paths_exist(rel):
    path = REPO / rel
    assert path.is_file(), f"{rel} (named in README.md) does not exist"
    # the same file as the packaged one, not a copy that can drift
    assert path.resolve() == (REPO / "src/stapo" / rel).resolve()


# ------------------------------------------------------------------------------------- analyze runs --html


def _run_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    rows = [{"step": s, "reward": 0.1 * s, "entropy": 0.5, "kind": "train"} for s in range(1, 4)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_analyze_runs_html_flag(tmp_path, capsys):
    a, b = _run_dir(tmp_path / "grpo"), _run_dir(tmp_path / "demo")
    report = tmp_path / "somewhere" / "report.html"
    assert main(["analyze", "runs", str(a), str(b), "--out", str(tmp_path / "plots"), "--html", str(report)]) == 0
    assert report.is_file() and report.read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "plots" / "curves.png").is_file()
    assert not (tmp_path / "plots" / "runs.html").exists()  # written where --html says, only there
    assert f"report: {report}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- eval: missing benchmarks


def test_eval_without_a_data_folder_names_the_three_ways(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STAPO_DATA_DIR", raising=False)
    # a shared/data/benchmarks folder beside the working directory is no way of giving the files
    shared = tmp_path / "shared" / "data" / "benchmarks"
    shared.mkdir(parents=True)
    (shared / "aime24.jsonl").write_text(json.dumps({"id": "a", "problem": "P", "answer": "1"}) + "\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    # (tiny sizes: were the folder found, the run would be one greedy token)
    assert main(["eval", "--model", "embedded", "--benchmarks", "aime24", "--limit", "1", "--setting", "greedy",
                 "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stapo eval: error: benchmark files: no folder given") and err.count("\n") == 1
    assert "--hub" in err and "--data-dir" in err and "STAPO_DATA_DIR" in err
    assert "shared" not in err and "load_prompts(" not in err  # the CLI way, not a Python call
    assert not (tmp_path / "work" / "runs").exists()


# ------------------------------------------------------------------------------------- eval: tables, greedy


def test_seeded_sampler_temperature_zero_is_argmax():
    torch = pytest.importorskip("torch")
    from stapo.eval.backends import SeededSampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    sampler = SeededSampler(seeds=list(range(6)), temperatures=[0.0, 1.0, 0.0, 0.7, 0.0, 1.0],
                            top_ps=[1.0, 1.0, 0.9, 0.9, 1.0, 1.0])
    tokens = sampler.sample(logits)
    for row in (0, 2, 4):
        assert int(tokens[row]) == int(logits[row].argmax())
    # the sampled rows still draw from their own streams (same seeds, same tokens as without greedy rows)
    ref = SeededSampler(seeds=list(range(6)), temperatures=[1.0] * 6, top_ps=[1.0, 1.0, 0.9, 0.9, 1.0, 1.0])
    ref_tokens = ref.sample(logits)
    assert int(tokens[1]) == int(ref_tokens[1]) and int(tokens[5]) == int(ref_tokens[5])


class _RecordingBackend:
    name = "recording-stub"
    batch_size = 64
    info = {"backend": "recording-stub"}

    def __init__(self):
        self.requests = []

    def generate(self, requests):
        from stapo.eval.backends import Completion

        self.requests.extend(requests)
        return [Completion(text="The answer is \\boxed{2}.", token_ids=(1, 2), finish_reason="stop") for _ in requests]


def test_greedy_setting_one_sample_at_t0_and_tables(tmp_path, qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    from stapo.eval.report import run_table
    from stapo.eval.runner import EvalConfig, evaluate

    data = tmp_path / "data"
    data.mkdir()
    (data / "math500.jsonl").write_text("".join(
        json.dumps({"id": f"m{i}", "problem": f"What is {i} + {2 - i}?", "answer": "2", "meta": {}}) + "\n"
        for i in range(3)))
    backend = _RecordingBackend()
    config = EvalConfig(model="stub", out_dir=tmp_path / "run", benchmarks=["math500"], settings=["train", "greedy"],
                        samples=3, data_dir=str(data), progress=False)
    results = evaluate(config, backend=backend, tokenizer=AutoTokenizer.from_pretrained(qwen3_tokenizer_dir))
    temps = sorted(r.temperature for r in backend.requests)
    assert temps == [0.0] * 3 + [1.0] * 9  # greedy: one sample per problem; train: k = 3
    assert results["results"]["greedy"]["math500"]["k"] == 1
    assert results["results"]["train"]["math500"]["k"] == 3
    table = run_table(results)
    assert "## greedy (T=0)" in table and "## train (T=1.0, top-p=1.0)" in table
    assert "answer extraction: auto: last \\boxed{}, else 'answer is X', else the last number" in table
    assert "| avg@k | 100.0 ± 0.0 | 100.0 ± 0.0 |" in table


def test_default_setting_is_all_three():
    args = build_parser().parse_args(["eval", "--model", "m"])
    assert args.setting is None  # resolved in run(): None = all, so --compare can tell it was not typed
    from stapo.eval.protocol import parse_settings

    assert parse_settings("all") == ["train", "nucleus", "greedy"]


# ------------------------------------------------------------------------------------- eval --compare


def _results_dir(path: Path, settings=("train", "nucleus")) -> Path:
    bench = {"n_problems": 30, "k": 32, "avg@k": 0.5, "avg@k_se": 0.05, "pass@k": 0.8, "pass@k_se": 0.04,
             "maj@k": 0.6, "maj@k_se": 0.05}
    per = {s: {"aime24": dict(bench), "average": {"benchmarks": ["aime24"], **{k: v for k, v in bench.items()
                                                                               if "@" in k}}} for s in settings}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "model": "m", "extract": "boxed", "results": per,
        "settings": {s: {"temperature": 1.0 if s == "train" else 0.7, "top_p": 1.0 if s == "train" else 0.9}
                     for s in settings}}))
    return path


def test_compare_setting_selects_tables(tmp_path, capsys):
    a, b = _results_dir(tmp_path / "grpo"), _results_dir(tmp_path / "stapo")
    assert main(["eval", "--compare", str(a), str(b), "--setting", "nucleus"]) == 0
    out = capsys.readouterr().out
    assert "## avg@k, nucleus" in out and "## avg@k, train" not in out
    assert "| grpo | 50.0 ± 5.0 | 50.0 ± 5.0 | boxed |" in out
    assert "AIME24 (k=32, n=30)" in out
    assert "extraction boxed: last \\boxed{} only (strict)" in out
    assert main(["eval", "--compare", str(a), str(b)]) == 0
    both = capsys.readouterr().out
    assert "## avg@k, nucleus" in both and "## avg@k, train" in both
    # a setting no run has: said, not an empty table
    assert main(["eval", "--compare", str(a), "--setting", "greedy"]) == 2
    assert "no run has results for greedy" in capsys.readouterr().err


def test_compare_refuses_generation_options(tmp_path, capsys):
    a = _results_dir(tmp_path / "grpo")
    assert main(["eval", "--compare", str(a), "--samples", "4", "--max-new-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "--samples" in err and "--max-new-tokens" in err and "--compare reads finished runs" in err
    assert main(["eval", "--model", "m", "--metric", "pass@k"]) == 2
    assert "--metric chooses the metric of --compare" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- one vocabulary


def test_samples_flag_and_its_aliases_are_one_option():
    parser = build_parser()
    for flag in ("--samples", "--group-size", "-G"):
        args = parser.parse_args(["analyze", "tokens", "--data", "synthetic:add1?n=2", flag, "4"])
        assert args.group_size == 4, flag
    assert parser.parse_args(["eval", "--model", "m", "-G", "3"]).samples == 3
    text = parser._subparsers._group_actions[0].choices["analyze"]._subparsers._group_actions[0] \
        .choices["tokens"].format_help()
    assert "--samples" in text and "num_generations" in text and "prompt_template" in text


def _record(prompt: str, token_text: list[str], reward: float, advantage: float, token_id=None,
            completion: str | None = None) -> dict:
    """One rollout sample with made-up but consistent per-token statistics."""
    import numpy as np

    n = len(token_text)
    p = np.linspace(0.3, 0.9, n)
    completion = "".join(token_text) if completion is None else completion
    return {"prompt": prompt, "completion": completion, "reward": reward, "advantage": advantage,
            "token_id": np.arange(n) if token_id is None else np.asarray(token_id), "token_text": token_text,
            "logprob": np.log(p), "entropy": np.linspace(0.1, 1.0, n), "collision": p**2,
            "s2t": np.zeros(n, bool)}


def _demo_like_run(tmp_path: Path) -> Path:
    from stapo.data.rollouts import write_rollouts

    run = tmp_path / "demo"
    write_rollouts(run, 2, [_record("<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n",
                                    [" 1", " +", " 1", " =", " 2"], 1.0, 0.5),
                            _record("<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n",
                                    [" 3"], 0.0, -0.5)])
    (run / "config.yaml").write_text("prompt_template: boxed_short\nnum_generations: 4\nmax_completion_length: 32\n"
                                     "temperature: 0.9\ntau_p: 0.02\ntau_h: 0.2\ntau_h_quantile: null\n")
    return run


def test_analyze_tokens_defaults_to_the_runs_settings(tmp_path, capsys):
    from stapo.commands.analyze import resolve_tokens_defaults

    run = _demo_like_run(tmp_path)
    parser = build_parser()
    args = parser.parse_args(["analyze", "tokens", "--run", str(run), "--data", "synthetic:add1?n=2"])
    resolve_tokens_defaults(args)
    assert (args.template, args.group_size, args.max_new_tokens, args.temperature) == ("boxed_short", 4, 32, 0.9)
    assert (args.tau_p, args.tau_h) == (0.02, 0.2)
    # what the user types wins over the run
    args = parser.parse_args(["analyze", "tokens", "--run", str(run), "--data", "x.jsonl", "--template", "boxed",
                              "--tau-h-quantile", "0.1"])
    resolve_tokens_defaults(args)
    assert (args.template, args.tau_h, args.tau_h_quantile) == ("boxed", None, 0.1)
    # without a run: the built-in defaults
    args = parser.parse_args(["analyze", "tokens", "--data", "synthetic:add1?n=2"])
    resolve_tokens_defaults(args)
    # without a run the S2T flags stay unset: stapo.core.S2TSettings fills its defaults
    assert (args.template, args.group_size, args.tau_p, args.tau_h, args.tau_h_quantile) == (
        "boxed", 8, None, None, None)

    # --rollouts RUN_DIR: the thresholds the run trained with
    out = tmp_path / "a"
    assert main(["analyze", "tokens", "--rollouts", str(run), "--out", str(out)]) == 0
    summary = json.loads((out / "tokens_summary.json").read_text())["summary"]
    assert summary["tau_p"] == 0.02 and summary["tau_h"] == 0.2
    assert "tau_h=0.2 (from" in capsys.readouterr().err
    # --run alone: its captured rollouts
    assert main(["analyze", "tokens", "--run", str(run), "--out", str(tmp_path / "b")]) == 0


# ------------------------------------------------------------------------------------- analyze HTML samples


def _report_of(records, from_run):
    from stapo.analyze.report import build_report
    from stapo.data.rollouts import rollouts_from_records

    ro = rollouts_from_records(records, step=0, metadata={})
    return build_report("t", rollouts=ro, s2t_flat=ro.s2t, from_run=from_run)


def test_prompt_renders_without_chat_tokens_and_whole_words():
    import html as html_mod

    question = "Compute the sum of the first " + "ten positive integers and then " * 8 + "report it."
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
              f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    page = _report_of([_record(prompt, [" 55"], 1.0, 0.5)], from_run=False)
    shown = html_mod.unescape(page.split('<div class="prompt">')[1].split("</div>")[0])
    assert "<|" not in shown and "|>" not in shown and "system" not in shown and "SmolLM" not in shown
    assert shown.startswith("… ") and shown.endswith("report it.")
    first_word = shown[2:].split()[0]
    assert first_word in question.split()  # not cut mid-word
    from stapo.analyze.report import prompt_text

    assert prompt_text("<|user|>What is 2 + 2?<|assistant|>") == "What is 2 + 2?"


def test_multibyte_character_split_across_tokens_renders_whole(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    text = " 答案是 ✓ 7"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs a character split across tokens"
    page = _report_of([_record("<|im_start|>user\nq<|im_end|>\n", pieces, 1.0, 0.5, token_id=ids,
                                  completion=tok.decode(ids))], from_run=True)
    tokens_html = page.split('<div class="tokens">')[1].split("</div>")[0]
    assert "\ufffd" not in tokens_html
    import re

    assert "".join(re.findall(r">([^<]*)</span>", tokens_html)) == text
    assert "step 0, sample" in page  # captured rollouts keep their step


def test_no_step_label_for_data_model_analyses():
    page = _report_of([_record("q", [" 1"], 1.0, 0.5)], from_run=False)
    assert "step 0" not in page and "sample 0 ·" in page
