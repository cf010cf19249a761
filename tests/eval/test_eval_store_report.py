"""The resumable sample log and the markdown tables (atomic writes: tests/test_rundir.py)."""

from __future__ import annotations

import json

import pytest

from stapo.eval.report import compare_table, load_results, run_table
from stapo.eval.store import SampleLog


def _rec(i, bench="math500", setting="train", pid="p1", **extra):
    return {"benchmark": bench, "setting": setting, "problem_id": pid, "sample_idx": i, **extra}


def test_sample_log_roundtrip_and_torn_last_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    log = SampleLog(path)
    log.append([_rec(0, completion="a"), _rec(1, completion="b")])
    log.append([_rec(0, pid="p2", completion="c")])
    # simulate an interrupted write: half a record without its newline
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_rec(1, pid="p2"))[:20])
    again = SampleLog(path)
    assert again.dropped_torn_line
    assert len(again) == 3
    assert ("math500", "train", "p2", 0) in again and ("math500", "train", "p2", 1) not in again
    assert again.get(("math500", "train", "p1", 1))["completion"] == "b"
    # the torn tail was cut: appending continues on a clean line, and a third read sees 4 records
    again.append([_rec(1, pid="p2", completion="d")])
    third = SampleLog(path)
    assert not third.dropped_torn_line and len(third) == 4
    assert path.read_text().endswith("\n")


def test_sample_log_rejects_foreign_lines(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"benchmark": "x"}\n')
    with pytest.raises(ValueError, match="line 1 is not a sample record"):
        SampleLog(path)
    with pytest.raises(ValueError, match="lacks"):
        SampleLog(tmp_path / "other.jsonl").append([{"benchmark": "x"}])


def _bench(avg, k=4, n=10):
    return {"n_problems": n, "k": k, "avg@k": avg, "avg@k_se": 0.01, "pass@k": min(1.0, avg * 2), "pass@k_se": 0.02,
            "maj@k": avg, "maj@k_se": 0.03, "pass@j": {"1": avg}}


def _results(values: dict, setting="train"):
    per = {b: _bench(v) for b, v in values.items()}
    per["average"] = {"benchmarks": list(values), "avg@k": sum(values.values()) / len(values), "avg@k_se": 0.01,
                      "pass@k": 0.5, "pass@k_se": 0.0, "maj@k": 0.5, "maj@k_se": 0.0}
    return {"model": "m", "backend": "hf", "max_new_tokens": 8, "seed": 0, "stapo_version": "0.1.0",
            "settings": {setting: {"temperature": 1.0, "top_p": 1.0}}, "results": {setting: per},
            "flagged": {"olympiadbench": [{"id": "olympiadbench-1", "reason": "relay"}]}}


def test_run_table_shape_and_numbers():
    table = run_table(_results({"math500": 0.25, "aime24": 0.5}))
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| metric"))
    # paper order: AIME24 before MATH500, then the average
    assert header.index("AIME24") < header.index("MATH500") < header.index("Average (2)")
    avg_row = next(line for line in lines if line.startswith("| avg@k"))
    assert avg_row == "| avg@k | 50.0 ± 1.0 | 25.0 ± 1.0 | 37.5 ± 1.0 |"
    assert "train (T=1.0, top-p=1.0)" in table
    assert "OlympiadBench: 1 (olympiadbench-1)" in table


def test_compare_table_rows_are_runs(tmp_path):
    a = _results({"aime24": 0.5, "math500": 0.25, "minerva": 0.1})
    b = _results({"aime24": 0.75, "math500": 0.5})
    for name, r in (("grpo", a), ("stapo", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    runs = [(n, load_results(tmp_path / n)) for n in ("grpo", "stapo")]
    table = compare_table(runs)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    # the papers' convention: percent, ± SE, k and n per benchmark, the extraction rule named
    assert lines[0] == ("| run | AIME24 (k=4, n=10) | MATH500 (k=4, n=10) | Minerva (k=4, n=10) | Average (2) "
                        "| extraction |")
    # the average is over the benchmarks both runs have (AIME24, MATH500); its SE = sqrt(2 * 1.0^2) / 2
    assert lines[2] == "| grpo | 50.0 ± 1.0 | 25.0 ± 1.0 | 10.0 ± 1.0 | 37.5 ± 0.7 | ? |"
    assert lines[3] == "| stapo | 75.0 ± 1.0 | 50.0 ± 1.0 | – | 62.5 ± 0.7 | ? |"
    plain = [line for line in compare_table(runs, with_se=False).splitlines() if line.startswith("|")]
    assert plain[2] == "| grpo | 50.0 | 25.0 | 10.0 | 37.5 | ? |"
    with pytest.raises(ValueError, match="unknown metric"):
        compare_table(runs, metric="acc")


def test_load_results_errors(tmp_path):
    with pytest.raises(ValueError, match="no results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable results file"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="not a 'stapo eval' results file"):
        load_results(tmp_path / "results.json")
