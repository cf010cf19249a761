"""`stapo eval` end to end: grading sanity on the six real files, the CLI on a tiny model, resume."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from stapo.eval.backends import Completion
from stapo.eval.protocol import BENCHMARKS
from stapo.eval.runner import EvalConfig, EvalError, evaluate


class AnswerBackend:
    """A stand-in model that answers every problem with a fixed function of its gold answer."""

    name = "answer-stub"
    batch_size = 256
    info = {"backend": "answer-stub"}

    def __init__(self, tokenizer, gold_by_prompt: dict, answer):
        self.tokenizer, self.gold_by_prompt, self.answer = tokenizer, gold_by_prompt, answer
        self.calls = 0

    def generate(self, requests):
        self.calls += len(requests)
        out = []
        for r in requests:
            text = f"Some reasoning.\nThe final answer is {self.answer(self.gold_by_prompt[r.prompt_ids])}."
            out.append(Completion(text=text, token_ids=tuple(range(5)), finish_reason="stop"))
        return out


def _stub(tokenizer, benchmarks, answer, data_dir=None):
    from stapo.data import load_benchmark
    from stapo.eval.runner import prompt_token_ids

    gold = {}
    for b in benchmarks:
        for row in load_benchmark(b, data_dir=data_dir):
            gold[tuple(prompt_token_ids(tokenizer, row["problem"], "boxed"))] = row["answer"]
    return AnswerBackend(tokenizer, gold, answer)


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


@pytest.mark.slow  # ~40 s on 2 cores: the wrong answers go through math-verify
@pytest.mark.parametrize("case", ["correct", "wrong"])
def test_boxed_gold_scores_100_and_wrong_scores_0_on_all_six(tmp_path, qwen_tokenizer, case, benchmark_dir):
    # Exceptions: none. Every gold of the six files, boxed verbatim (zero-padded AIME answers,
    # $-wrapped and multi-answer OlympiadBench rows, Minerva's "$ $" row, MATH500 intervals and
    # \text{}), grades correct; a wrong value grades wrong everywhere.
    answer = (lambda g: f"\\boxed{{{g}}}") if case == "correct" else (lambda g: "\\boxed{\\frac{12345}{7}}")
    backend = _stub(qwen_tokenizer, BENCHMARKS, answer)
    config = EvalConfig(model="stub", out_dir=tmp_path / "run", samples=1, settings=["train"], progress=False)
    results = evaluate(config, backend=backend, tokenizer=qwen_tokenizer)
    per = results["results"]["train"]
    expected = 1.0 if case == "correct" else 0.0
    sizes = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272, "olympiadbench": 675}
    for b in BENCHMARKS:
        assert per[b]["n_problems"] == sizes[b]
        if per[b]["avg@k"] != expected:
            recs = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
            bad = [(r["problem_id"], r["gold"]) for r in recs if r["benchmark"] == b and r["correct"] != bool(expected)]
            pytest.fail(f"{b}: {len(bad)} rows graded {'wrong' if expected else 'correct'}: {bad[:5]}")
    assert per["average"]["avg@k"] == expected
    # relay problems are kept and flagged
    flagged = results["flagged"]["olympiadbench"]
    assert len(flagged) >= 15 and all("relay" in f["reason"] for f in flagged)
    assert not any(results["flagged"][b] for b in BENCHMARKS if b != "olympiadbench")


def _write_bench(dir_: Path, name: str, rows: list[dict]):
    dir_.mkdir(parents=True, exist_ok=True)
    with open(dir_ / f"{name}.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def test_quirks_and_metrics_through_the_pipeline(tmp_path, qwen_tokenizer):
    """Hand-made rows with the benchmarks' quirks; the stub answers in the 'other' notation."""
    data = tmp_path / "data"
    _write_bench(data, "aime24", [{"id": "a1", "problem": "P1", "answer": "025", "meta": {}},
                                  {"id": "a2", "problem": "P2", "answer": "204", "meta": {}}])
    _write_bench(data, "olympiadbench", [
        {"id": "o1", "problem": "Let $T=TNYWR$. Find T+1.", "answer": "$\\frac{1}{2 n+2}$", "meta": {}},
        {"id": "o2", "problem": "Find both.", "answer": "$69$,$84$", "meta": {"is_multiple_answer": True}},
        {"id": "o3", "problem": "Speed?", "answer": "$30$", "meta": {"unit": "km/h"}},
    ])
    _write_bench(data, "minerva", [{"id": "m1", "problem": "Energy?", "answer": "4.5e33", "meta": {}}])
    _write_bench(data, "math500", [{"id": "t1", "problem": "Interval?", "answer": "(2,\\infty)", "meta": {}},
                                   {"id": "t2", "problem": "Who?", "answer": "\\text{Evelyn}", "meta": {}}])
    other = {"025": "25", "204": "204", "$\\frac{1}{2 n+2}$": "\\frac{1}{2n+2}", "$69$,$84$": "84, 69",
             "$30$": "30", "4.5e33": "4.5 \\times 10^{33}", "(2,\\infty)": "(2, \\infty)", "\\text{Evelyn}": "Evelyn"}
    backend = _stub(qwen_tokenizer, ["aime24", "olympiadbench", "minerva", "math500"],
                    lambda g: f"\\boxed{{{other[g]}}}", data_dir=data)
    # grade_timeout: this test is about notation, not latency; a busy 2-core machine can take more than
    # the default 5 s for the first math-verify grading of a worker (bounded latency: test_grading_fuzz)
    config = EvalConfig(model="stub", out_dir=tmp_path / "run", samples=3, settings=["nucleus"],
                        benchmarks=["aime24", "math500", "minerva", "olympiadbench"], data_dir=str(data),
                        progress=False, grade_timeout=60.0)
    results = evaluate(config, backend=backend, tokenizer=qwen_tokenizer)
    per = results["results"]["nucleus"]
    for b in ("aime24", "math500", "minerva", "olympiadbench"):
        assert per[b]["avg@k"] == 1.0 and per[b]["maj@k"] == 1.0 and per[b]["pass@k"] == 1.0, b
        assert per[b]["k"] == 3
    assert [f["id"] for f in results["flagged"]["olympiadbench"]] == ["o1"]
    recs = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert len(recs) == 3 * 8
    r = next(r for r in recs if r["problem_id"] == "a1")
    assert (r["extracted"], r["gold"], r["correct"], r["temperature"], r["top_p"]) == ("25", "025", True, 0.7, 0.9)
    assert next(r for r in recs if r["problem_id"] == "o1")["flag"].startswith("relay")
    assert "Please reason step by step" in r["prompt"] and "P1" in r["prompt"]


def test_errors_are_one_clear_line(tmp_path, qwen_tokenizer):
    data = tmp_path / "data"
    _write_bench(data, "aime24", [{"id": "a1", "problem": "P1", "answer": "1", "meta": {}}])
    with pytest.raises(EvalError, match="math500.jsonl: benchmark file not found"):
        evaluate(EvalConfig(model="x", out_dir=tmp_path / "r", benchmarks=["math500"], data_dir=str(data)))
    assert not (tmp_path / "r").exists()  # nothing written before the data is valid
    # an out dir of a different run is refused
    backend = _stub(qwen_tokenizer, ["aime24"], lambda g: g, data_dir=data)
    cfg = EvalConfig(model="x", out_dir=tmp_path / "r", benchmarks=["aime24"], data_dir=str(data), samples=1,
                     settings=["train"], progress=False)
    evaluate(cfg, backend=backend, tokenizer=qwen_tokenizer)
    cfg.max_new_tokens = 7
    with pytest.raises(EvalError, match="max_new_tokens=4096.*use another --out"):
        evaluate(cfg, backend=backend, tokenizer=qwen_tokenizer)


def test_disk_full_is_one_clear_error_and_keeps_the_earlier_results(tmp_path, qwen_tokenizer, monkeypatch):
    import errno

    data = tmp_path / "data"
    _write_bench(data, "aime24", [{"id": "a1", "problem": "P1", "answer": "1", "meta": {}}])
    backend = _stub(qwen_tokenizer, ["aime24"], lambda g: g, data_dir=data)
    cfg = EvalConfig(model="x", out_dir=tmp_path / "r", benchmarks=["aime24"], data_dir=str(data), samples=1,
                     settings=["train"], progress=False)
    evaluate(cfg, backend=backend, tokenizer=qwen_tokenizer)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}

    _write_bench(data, "aime24", [{"id": "a1", "problem": "P1", "answer": "1", "meta": {}},
                                  {"id": "a2", "problem": "P2", "answer": "2", "meta": {}}])
    backend = _stub(qwen_tokenizer, ["aime24"], lambda g: g, data_dir=data)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the sample log's and every atomic write's flush
    with pytest.raises(EvalError, match=r"/r: no space left on device; free some space and rerun"):
        evaluate(cfg, backend=backend, tokenizer=qwen_tokenizer)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    assert sorted(after) == sorted(before)  # no temporary file left
    assert after["results.json"] == before["results.json"] and after["run.json"] == before["run.json"]


# ------------------------------------------------------------------------------------ CLI, tiny model


def _cli(*argv):
    from stapo.cli import main

    return main(list(argv))


def test_cli_end_to_end_tiny_model_and_resume(tmp_path, tiny_qwen3_dir, capsys):
    import torch

    torch.set_num_threads(1)
    data = tmp_path / "data"
    for b in BENCHMARKS:
        _write_bench(data, b, [{"id": f"{b}-{i}", "problem": f"What is {i}+{i}?", "answer": str(2 * i), "meta": {}}
                               for i in range(3)])
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_qwen3_dir), "--benchmarks", "all", "--limit", "2", "--samples", "2",
            "--max-new-tokens", "8", "--setting", "train", "--data-dir", str(data), "--out", str(out),
            "--backend", "hf", "--no-progress"]
    assert _cli(*args) == 0
    printed = capsys.readouterr()
    assert "| avg@k |" in printed.out and "Average (6)" in printed.out
    assert "backend hf" in printed.err
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "hf" and results["backend_info"]["backend"] == "hf"
    assert results["complete"] and results["k"] == {b: 2 for b in BENCHMARKS}
    assert (out / "results.md").read_text().startswith("# stapo eval")
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 6 * 2 * 2
    assert all(r["completion_tokens"] <= 8 and r["gen_s"] > 0 for r in recs)
    first = {(r["benchmark"], r["problem_id"], r["sample_idx"]): r["completion"] for r in recs}

    # resume: nothing left to do -> no model load, no new samples, same table
    assert _cli(*args) == 0
    assert "24 already in samples.jsonl, 0 to generate" in capsys.readouterr().err
    assert len((out / "samples.jsonl").read_text().splitlines()) == 24

    # interrupted run: drop half the samples and tear the last line; rerun regenerates exactly those
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text("\n".join(lines[:12]) + "\n" + lines[12][:30])
    assert _cli(*args) == 0
    assert "= 24 samples, up to 8 new tokens each; 12 already in samples.jsonl, 12 to generate" \
        in capsys.readouterr().err
    again = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(again) == 24
    # per-sample seeds: the regenerated samples are the ones the first run produced
    assert {(r["benchmark"], r["problem_id"], r["sample_idx"]): r["completion"] for r in again} == first
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    # --compare: runs as rows
    import shutil

    shutil.copytree(out, tmp_path / "stapo-run")
    assert _cli("eval", "--compare", str(out), str(tmp_path / "stapo-run")) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| run") or line.startswith("| stapo-run")]
    assert [r.split(" |")[0] for r in rows] == ["| run", "| run", "| stapo-run"]  # header, then one row per run
    assert re.search(r"\| AIME24 \(k=\d+, n=\d+\) \| AIME25 \(k=\d+, n=\d+\) \| AMC23 .*\| OlympiadBench "
                     r"\(k=\d+, n=\d+\) \| Average \(6\) \| extraction \|", table)
    assert "extraction auto: last \\boxed{}" in table


def test_cli_user_errors(tmp_path, capsys):
    assert _cli("eval", "--model", "embedded", "--benchmarks", "gsm8k") == 2
    assert "unknown benchmark 'gsm8k'" in capsys.readouterr().err
    assert _cli("eval") == 2
    assert "--model is required" in capsys.readouterr().err
    assert _cli("eval", "--compare", str(tmp_path)) == 2
    assert "no results.json" in capsys.readouterr().err
    data = tmp_path / "data"
    _write_bench(data, "aime24", [{"id": "a1", "problem": "P1", "answer": "1", "meta": {}}])
    missing = tmp_path / "no-such-model"
    assert _cli("eval", "--model", str(missing), "--benchmarks", "aime24", "--data-dir", str(data),
                "--out", str(tmp_path / "r"), "--backend", "hf") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"stapo eval: error: model '{missing}': no such directory {missing}"]  # no plan before it
    assert not (tmp_path / "r").exists()  # a failed start leaves no run directory behind
