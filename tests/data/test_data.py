"""stapo.data: loaders (JSONL, JSON, Parquet, datasets directory), error paths, benchmarks,
prompt formats and synthetic tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stapo.data import (
    BENCHMARK_HUB_IDS,
    BENCHMARKS,
    SYNTHETIC_TASKS,
    DataError,
    build_messages,
    find_benchmark_dir,
    format_prompt,
    load_benchmark,
    load_prompts,
    synthetic_task,
    task_for_difficulty,
    ungradable_reason,
)

REPO = Path(__file__).resolve().parents[2]

ROWS = [
    {"id": "a", "problem": "What is 1+1?", "answer": "2", "level": 1},
    {"id": "b", "problem": "What is 2+3?", "answer": 5, "level": 2},  # int answer -> "5"
    {"id": "c", "problem": "Half of 3?", "answer": 1.5, "level": 3},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _check_rows(rows):
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert [r["problem"] for r in rows] == ["What is 1+1?", "What is 2+3?", "Half of 3?"]
    assert [r["answer"] for r in rows] == ["2", "5", "1.5"]
    assert [r["meta"]["level"] for r in rows] == [1, 2, 3]


# ---------------------------------------------------------------- loaders


def test_jsonl(tmp_path):
    _check_rows(load_prompts(_write_jsonl(tmp_path / "p.jsonl", ROWS)))


def test_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS))
    _check_rows(load_prompts(path))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    table = pa.table(
        {
            "id": [r["id"] for r in ROWS],
            "problem": [r["problem"] for r in ROWS],
            "answer": ["2", "5", "1.5"],
            "level": [1, 2, 3],
        }
    )
    pq.write_table(table, path)
    _check_rows(load_prompts(path))


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = {
        "id": [r["id"] for r in ROWS],
        "problem": [r["problem"] for r in ROWS],
        "answer": ["2", "5", "1.5"],
        "level": [1, 2, 3],
    }
    single = tmp_path / "single"
    datasets.Dataset.from_dict(data).save_to_disk(str(single))
    _check_rows(load_prompts(single))
    both = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(data),
         "test": datasets.Dataset.from_dict({k: v[:1] for k, v in data.items()})}
    ).save_to_disk(str(both))
    _check_rows(load_prompts(both))  # train by default
    assert len(load_prompts(both, split="test")) == 1
    with pytest.raises(DataError, match="no split 'validation'"):
        load_prompts(both, split="validation")


def test_column_mapping(tmp_path):
    rows = [{"question": "Q1", "final": ["$3$"], "uid": 7}, {"question": "Q2", "final": "4", "uid": 8}]
    out = load_prompts(_write_jsonl(tmp_path / "m.jsonl", rows), problem_key="question", answer_key="final",
                       id_key="uid")
    assert [(r["id"], r["problem"], r["answer"]) for r in out] == [("7", "Q1", "$3$"), ("8", "Q2", "4")]
    # without an id column the id is <file stem>-<row>
    out = load_prompts(_write_jsonl(tmp_path / "m.jsonl", rows), problem_key="question", answer_key="final")
    assert [r["id"] for r in out] == ["m-1", "m-2"]
    # prompts without gold answers
    out = load_prompts(_write_jsonl(tmp_path / "m.jsonl", rows), problem_key="question", answer_key=None)
    assert "answer" not in out[0]


def test_limit(tmp_path):
    assert len(load_prompts(_write_jsonl(tmp_path / "p.jsonl", ROWS), limit=2)) == 2


# ---------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"id": "x", "problem": "", "answer": "1"}, "line 2: field 'problem' is empty"),
        ({"id": "x", "problem": "   ", "answer": "1"}, "line 2: field 'problem' is empty"),
        ({"id": "x", "answer": "1"}, "line 2: field 'problem' is missing"),
        ({"id": "x", "problem": "Q", "answer": ""}, "line 2: field 'answer' is empty"),
        ({"id": "x", "problem": "Q", "answer": None}, "line 2: field 'answer' is empty"),
        ({"id": "x", "problem": "Q"}, "line 2: field 'answer' is missing"),
        # a JSON object read as its Python text ("{'value': 3}") could never score: refused
        ({"id": "x", "problem": "Q", "answer": {"value": 3}}, "line 2: field 'answer' is a JSON object"),
        ({"id": "x", "problem": "Q", "answer": [1, {"value": 3}]}, "line 2: field 'answer' is a JSON object"),
        ({"id": "x", "problem": {"text": "Q"}, "answer": "1"}, "line 2: field 'problem' is a JSON object"),
        ([1, 2], "line 2: expected an object"),
    ],
)
def test_invalid_row_names_file_and_line(tmp_path, bad_row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(bad_row) + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert str(path) in str(e.value) and message in str(e.value)
    skipped = load_prompts(path, on_invalid="skip")
    assert [r["id"] for r in skipped] == ["a", "b"]
    assert len(skipped.skipped) == 1 and skipped.skipped[0][0] == 2
    assert message.split(": ", 1)[1] in skipped.skipped[0][1]


def test_invalid_parquet_row_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["Q1", "Q2", None], "answer": ["1", "", "3"]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: field 'answer' is empty"):
        load_prompts(path)
    rows = load_prompts(path, on_invalid="skip")
    assert [r["problem"] for r in rows] == ["Q1"] and [n for n, _ in rows.skipped] == [2, 3]


def test_bad_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: not valid JSON"):
        load_prompts(path)


def test_bad_parquet_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        load_prompts(path)


def test_bad_json_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_prompts(path)


def test_unknown_suffix_missing_file_and_bad_options(tmp_path):
    (tmp_path / "p.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        load_prompts(tmp_path / "p.csv")
    with pytest.raises(DataError, match="no such file or directory"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such file or directory"):
        load_prompts("./nope/data.parquet")
    with pytest.raises(ValueError, match="on_invalid"):
        load_prompts(tmp_path / "p.csv", on_invalid="ignore")
    with pytest.raises(ValueError, match="limit"):
        load_prompts(tmp_path / "p.csv", limit=-1)


def test_not_a_datasets_directory(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a datasets directory"):
        load_prompts(tmp_path / "empty")


def test_hub_id_goes_to_load_dataset_and_failures_are_clear(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        if path == "owner/ok":
            return datasets.Dataset.from_dict({"question": ["Q"], "final_answer": [["$7$"]]})
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_prompts("owner/ok", problem_key="question", answer_key="final_answer", name="cfg")
    assert rows[0]["problem"] == "Q" and rows[0]["answer"] == "$7$"
    assert calls[0] == ("owner/ok", "train", {"name": "cfg"})
    with pytest.raises(DataError, match="owner/missing: not a local file or directory, and could not load"):
        load_prompts("owner/missing", split="test")
    assert calls[1][1] == "test"


# ---------------------------------------------------------------- benchmarks


def test_load_every_benchmark(benchmark_dir):
    counts = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272, "olympiadbench": 675}
    for name in BENCHMARKS:
        rows = load_benchmark(name)  # from STAPO_DATA_DIR
        assert len(rows) == counts[name]
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == len(ids)
        for r in rows:
            assert r["problem"] and r["answer"] and isinstance(r["meta"], dict)
            assert r["benchmark"] == name and r["source"].startswith("github:")
    ob = load_benchmark("olympiadbench")
    # answers are kept verbatim ($-wrapped); the grader normalises them
    assert sum(r["answer"].startswith("$") for r in ob) == 266
    assert sum(r["ungradable"] is not None for r in ob) == 19  # the ARML relay (TNYWR) items
    assert all(r["ungradable"] is None for r in load_benchmark("math500"))
    aime = {r["id"]: r for r in load_benchmark("aime24", data_dir=benchmark_dir)}
    assert sum(r["answer"].startswith("0") for r in aime.values()) == 7
    assert len(load_prompts("benchmark:amc23")) == 40


def test_benchmark_dir_is_data_dir_or_stapo_data_dir_only(monkeypatch, tmp_path):
    def folder(path: Path) -> Path:
        path.mkdir(parents=True)
        (path / "aime24.jsonl").write_text(json.dumps({"id": "a", "problem": "P", "answer": "1"}) + "\n")
        return path

    # a shared/data/benchmarks folder beside the working directory is not looked at
    folder(tmp_path / "shared" / "data" / "benchmarks")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("STAPO_DATA_DIR", raising=False)
    with pytest.raises(DataError) as e:
        find_benchmark_dir()
    assert "no folder given" in str(e.value) and "shared" not in str(e.value)
    for way in ("--hub", "--data-dir", "STAPO_DATA_DIR"):
        assert way in str(e.value)
    with pytest.raises(DataError, match="no folder given"):
        load_prompts("benchmark:aime24")
    # STAPO_DATA_DIR, a folder of files or one holding benchmarks/; data_dir wins over it
    env_dir = folder(tmp_path / "env" / "benchmarks")
    monkeypatch.setenv("STAPO_DATA_DIR", str(env_dir.parent))
    assert find_benchmark_dir() == env_dir
    given = folder(tmp_path / "given")
    assert find_benchmark_dir(given) == given
    monkeypatch.setenv("STAPO_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="not found in .*empty \\(STAPO_DATA_DIR\\)"):
        load_benchmark("aime24")


def test_gold_that_is_a_json_object_is_refused_naming_file_and_row(tmp_path):
    rows = [{"id": "a", "problem": "P", "answer": "1"},
            {"id": "b", "problem": "P", "answer": {"value": 3, "unit": "m"}}]
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "aime24.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_benchmark("aime24", data_dir=bench)
    assert f"{bench / 'aime24.jsonl'}: line 2: field 'answer' is a JSON object" in str(e.value)
    assert '"unit": "m"' in str(e.value)  # shown as the file has it, not as Python's text
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"rows.json: row 2: field 'answer' is a JSON object"):
        load_prompts(tmp_path / "rows.json")
    assert [r["answer"] for r in load_prompts(tmp_path / "rows.json", answer_key="answer", on_invalid="skip")] == ["1"]
    # a list of scalars stays an answer with several parts
    (tmp_path / "parts.jsonl").write_text(json.dumps({"problem": "P", "answer": [69, 84]}) + "\n")
    assert load_prompts(tmp_path / "parts.jsonl")[0]["answer"] == "69, 84"


def test_benchmark_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown benchmark 'gsm8k'"):
        load_benchmark("gsm8k")
    with pytest.raises(DataError, match="--data-dir") as e:
        load_benchmark("aime24", data_dir=tmp_path / "nowhere")
    assert "hub" in str(e.value)
    (tmp_path / "other.jsonl").write_text("")
    with pytest.raises(DataError, match="aime24.jsonl: benchmark file not found"):
        load_benchmark("aime24", data_dir=tmp_path)


def test_ungradable_reason():
    assert ungradable_reason({"problem": "Let $T=T N Y W R$. Find T+1."}) is not None
    assert ungradable_reason({"problem": "Let $T$ be the number you will receive. Find T."}) is not None
    assert ungradable_reason({"problem": "Find 1+1."}) is None


def test_hub_ids_documented_for_every_benchmark():
    assert set(BENCHMARK_HUB_IDS) == set(BENCHMARKS)
    for spec in BENCHMARK_HUB_IDS.values():
        assert "/" in spec["source"] and spec["problem_key"] and spec["answer_key"]


# ---------------------------------------------------------------- prompts


class _ChatTokenizer:
    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


class _BaseTokenizer:
    chat_template = None


def test_format_prompt_messages_and_strings():
    msgs = format_prompt("What is {x}?")
    assert msgs == [
        {"role": "user",
         "content": "What is {x}?\nPlease reason step by step, and put your final answer within \\boxed{}."}
    ]
    with_system = build_messages("Q", system_prompt="You are careful.")
    assert with_system[0] == {"role": "system", "content": "You are careful."}
    chat = format_prompt("Q", tokenizer=_ChatTokenizer(), system_prompt="S")
    assert chat == ("<|system|>S<|user|>Q\nPlease reason step by step, and put your final answer within "
                    "\\boxed{}.<|assistant|>")
    raw = format_prompt("Q", tokenizer=_BaseTokenizer(), system_prompt="S")
    assert raw == "S\n\nQ\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
    custom = format_prompt("Q", template="Problem: {problem}\nAnswer in \\boxed{{}}.")
    assert custom[0]["content"] == "Problem: Q\nAnswer in \\boxed{}."
    assert format_prompt("Q", template="plain")[0]["content"] == "Q"


def test_format_prompt_with_a_real_chat_template():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = format_prompt("What is 2+2?", tokenizer=tok)
    assert text == (
        "<|im_start|>user\nWhat is 2+2?\nPlease reason step by step, and put your final answer "
        "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_format_prompt_errors():
    with pytest.raises(ValueError, match="neither a known name"):
        format_prompt("Q", template="no placeholder here")
    with pytest.raises(ValueError, match="non-empty"):
        format_prompt("  ")


# ---------------------------------------------------------------- synthetic tasks


def test_synthetic_answers_are_correct():
    import re

    for task in SYNTHETIC_TASKS:
        for row in synthetic_task(task, 50, seed=3):
            p, a = row["problem"], int(row["answer"])
            m = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)(?: \+ (\d+))?\?", p)
            if m:
                x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
                expect = {"+": x + y, "-": x - y, "*": x * y}[op] + (int(z) if z else 0)
                assert a == expect, p
            else:
                m = re.fullmatch(r"Solve for x: (\d+)x ([-+]) (\d+) = (-?\d+)\.", p)
                assert m, p
                k, sign, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
                assert k * a + (b if sign == "+" else -b) == c, p


def test_synthetic_deterministic_and_splits_disjoint():
    assert synthetic_task("add2", 20, seed=1) == synthetic_task("add2", 20, seed=1)
    assert synthetic_task("add2", 20, seed=1) != synthetic_task("add2", 20, seed=2)
    for task in SYNTHETIC_TASKS:
        train = {r["problem"] for s in (0, 1) for r in synthetic_task(task, 300, seed=s, split="train")}
        held = {r["problem"] for s in (0, 1) for r in synthetic_task(task, 300, seed=s, split="heldout")}
        assert train and held and not (train & held), task


def test_synthetic_small_space_repeats_and_levels():
    rows = synthetic_task("add1", 200, seed=0, split="heldout")
    assert len(rows) == 200
    distinct = {r["problem"] for r in rows}
    assert 10 < len(distinct) < 40  # ~20% of the 100 single-digit sums, each repeated
    assert [task_for_difficulty(i) for i in range(1, 7)] == list(SYNTHETIC_TASKS)
    assert synthetic_task(1, 3) == synthetic_task("add1", 3)
    assert rows[0]["meta"] == {"task": "add1", "difficulty": 1, "split": "heldout", "seed": 0}


def test_synthetic_via_load_prompts_and_errors():
    rows = load_prompts("synthetic:mul1?n=7&seed=4&split=heldout")
    assert rows == synthetic_task("mul1", 7, seed=4, split="heldout")
    assert len(load_prompts("synthetic:3?n=5")) == 5
    with pytest.raises(ValueError, match="unknown synthetic task"):
        synthetic_task("calculus", 3)
    with pytest.raises(ValueError, match="split"):
        synthetic_task("add1", 3, split="test")
    with pytest.raises(ValueError, match="unknown parameter"):
        load_prompts("synthetic:add1?count=3")
    with pytest.raises(ValueError, match="integers"):
        load_prompts("synthetic:add1?n=many")


def test_synthetic_answers_grade_as_correct():
    from stapo.rewards import grade_batch

    rows = synthetic_task("linear", 30, seed=0)
    golds = [r["answer"] for r in rows]
    assert grade_batch([f"x = \\boxed{{{g}}}" for g in golds], golds) == [1.0] * 30
    assert grade_batch([f"x = \\boxed{{{int(g) + 1}}}" for g in golds], golds) == [0.0] * 30


# ---------------------------------------------------------------- unreadable input, one line each


def test_repeated_json_key_is_refused_naming_the_row(tmp_path):
    jsonl = tmp_path / "dup.jsonl"
    jsonl.write_text('{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2", "answer": "4", "answer": "5"}\n')
    with pytest.raises(DataError, match=r"dup.jsonl: line 3: key 'answer' appears twice"):
        load_prompts(jsonl)
    nested = tmp_path / "dup.json"
    nested.write_text('[{"problem": "1+1", "answer": "2"}, {"problem": "x", "answer": "3", "meta": {"a": 1, "a": 2}}]')
    with pytest.raises(DataError, match=r"dup.json: row 2: key 'a' appears twice"):
        load_prompts(nested)
    rows = load_prompts(nested, on_invalid="skip")
    assert [r["answer"] for r in rows] == ["2"] and rows.skipped[0][0] == 2
    wrapper = tmp_path / "wrap.json"
    wrapper.write_text('{"data": [], "data": [{"problem": "1+1", "answer": "2"}]}')
    with pytest.raises(DataError, match=r"wrap.json: key 'data' appears twice in the top-level object"):
        load_prompts(wrapper)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "\xff", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not UTF-8 text \(byte 0xff at column 14\)"):
        load_prompts(jsonl)
    as_json = tmp_path / "bad.json"
    as_json.write_bytes(b'[\n{"problem": "1+1", "answer": "2"},\n{"problem": "caf\xe9", "answer": "3"}\n]')
    with pytest.raises(DataError, match=r"bad.json: line 3: not UTF-8 text \(byte 0xe9 at column 17\)"):
        load_prompts(as_json)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"problem": "1+1", "answer": "2"}).encode() + b"\n")
    assert load_prompts(path)[0]["answer"] == "2"


def test_unknown_synthetic_task_is_a_data_error_naming_the_known_tasks():
    with pytest.raises(DataError, match=r"synthetic:nonsense: unknown synthetic task 'nonsense'; known: add1, chain3"):
        load_prompts("synthetic:nonsense")
    with pytest.raises(DataError, match=r"synthetic:add1\?split=test: split must be one of"):
        load_prompts("synthetic:add1?split=test")


def test_rows_remember_where_they_came_from(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "", "answer": "2"}\n'
                    '{"problem": "c", "answer": "3"}\n')
    rows = load_prompts(path, on_invalid="skip")
    assert [r["problem"] for r in rows] == ["a", "c"]
    assert rows.locations == [f"{path}: line 1", f"{path}: line 4"]
    assert load_prompts("synthetic:add1?n=3", limit=2).locations == [
        "synthetic:add1?n=3: row 1", "synthetic:add1?n=3: row 2"]


# ---------------------------------------------------------------- prompt lengths against the context


def test_prompt_token_limit_arithmetic():
    from stapo.data import prompt_token_limit

    assert prompt_token_limit(256, 4) == (
        252, "the model's context 256 (max_position_embeddings) minus max_completion_length 4")
    assert prompt_token_limit(256, 4, max_prompt_length=100) == (100, "max_prompt_length 100")
    assert prompt_token_limit(None, 4) == (None, "")
    with pytest.raises(DataError, match="max_completion_length 256 leaves no room"):
        prompt_token_limit(256, 256)


def _model_config_dir(path: Path, tokenizer_dir: Path, context: int) -> Path:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    transformers.Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=context).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_model_context_length_reads_config_only(tmp_path, qwen3_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from stapo.models import model_context_length

    assert model_context_length(str(_model_config_dir(tmp_path / "q", qwen3_tokenizer_dir, 96))) == 96
    transformers.GPT2Config(n_positions=128).save_pretrained(tmp_path / "gpt2")
    assert model_context_length(str(tmp_path / "gpt2")) == 128


def test_long_prompts_refused_or_skipped_and_counted(tmp_path, qwen3_tokenizer_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from stapo.data import fit_training_prompts

    model = _model_config_dir(tmp_path / "m", qwen3_tokenizer_dir, 64)
    tok = AutoTokenizer.from_pretrained(model)
    long_problem = " ".join(["seven"] * 80)
    # "plain" template, no chat template involved: the prompt is the problem; count it independently
    tok.chat_template = None
    n_long = len(tok.encode(long_problem + "\n", add_special_tokens=False))
    assert n_long > 60
    data = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2"},
                                               {"problem": long_problem, "answer": "7"},
                                               {"problem": "2+2", "answer": "4"}])
    rows = load_prompts(data)
    args = SimpleNamespace(max_completion_length=4)
    run = SimpleNamespace(prompt_template="plain", system_prompt=None, skip_invalid_rows=False, train_data=str(data),
                          eval_data=None, eval_max_new_tokens=None)
    with pytest.raises(DataError, match=rf"d.jsonl: line 2: prompt is {n_long} tokens, over the limit of 60 "):
        fit_training_prompts(run, args, str(model), tok, rows, None)
    run.skip_invalid_rows = True
    printed = []
    kept, _ = fit_training_prompts(run, args, str(model), tok, rows, None, printed.append)
    assert [r["problem"] for r in kept] == ["1+1", "2+2"]
    assert kept.locations == [f"{data}: line 1", f"{data}: line 3"] and len(kept.skipped) == 1
    assert printed == [f"stapo: skipped 1 row(s) of {data} whose prompt is over 60 tokens (first: {data}: line 2: "
                       f"prompt is {n_long} tokens, over the limit of 60 (the model's context 64 "
                       "(max_position_embeddings) minus max_completion_length 4))"]
    only_long = load_prompts(_write_jsonl(tmp_path / "l.jsonl", [{"problem": long_problem, "answer": "7"}]))
    with pytest.raises(DataError, match="every prompt is over the limit of 60 tokens"):
        fit_training_prompts(run, args, str(model), tok, only_long, None)


def test_a_huge_prompt_is_refused_from_its_length_without_tokenizing_it(tmp_path, qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    from stapo.data import long_prompts

    tok = AutoTokenizer.from_pretrained(_model_config_dir(tmp_path / "m", qwen3_tokenizer_dir, 64))
    longest = max(len(k) for k in tok.get_vocab())
    huge = "What is 1+1? " * 25_000  # 325,000 characters
    text = format_prompt(huge, tok, "boxed")
    (index, where, bound, exact), = long_prompts([("huge.jsonl: line 9", huge)], tok, 60, "boxed")
    assert (index, where, exact) == (0, "huge.jsonl: line 9", False)
    assert bound == -(-len(text) // longest) > 60
    # the bound is a true lower bound: the real count is larger
    assert len(tok(text, add_special_tokens=False)["input_ids"]) >= bound
    # short prompts below the limit in bytes are not tokenized and not reported
    assert long_prompts([("a", "1+1")], tok, 60, "boxed") == []
