"""Bad inputs through the command line, where users meet them: each is one `stapo <cmd>: error:` line
naming the file and row (or the known choices), exit code 2, no traceback, before any model weights load.

The model here is a config.json and a tokenizer with no weights at all: a command that got as far as
loading weights would fail differently, so each test also shows the check runs before that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTEXT = 256  # max_position_embeddings of the weightless model
COMPLETION = 4


@pytest.fixture(scope="module")
def weightless_model(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=CONTEXT,
    )
    out = tmp_path_factory.mktemp("weightless")
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    return out


def _stapo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stapo", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith(f"stapo {command}: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def _train(model: Path, train_data: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return _stapo("train", "demo", f"model={model}", f"train_data={train_data}", f"output_dir={tmp_path / 'run'}",
                  f"max_completion_length={COMPLETION}", "per_device_train_batch_size=4", "num_generations=4",
                  "eval_data=null", "prompt_template=boxed", *extra, cwd=tmp_path)


# ------------------------------------------------------------------ prompt length (train, eval)


def _chat_prompt_tokens(model: Path, problem: str) -> int:
    """The prompt's length as TRL would feed it, computed through the chat template's own tokenizing
    path (independent of stapo's counting)."""
    from transformers import AutoTokenizer

    from stapo.data import build_messages

    tok = AutoTokenizer.from_pretrained(model)
    return len(tok.apply_chat_template(build_messages(problem, "boxed"), add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])


def test_train_refuses_a_prompt_longer_than_the_context_before_loading_weights(weightless_model, tmp_path):
    long_problem = "What is " + " + ".join(["1"] * 300) + "?"
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n\n"
                    + json.dumps({"problem": long_problem, "answer": "300"}) + "\n", encoding="utf-8")
    line = _one_error_line(_train(weightless_model, str(data), tmp_path), "train")
    tokens = _chat_prompt_tokens(weightless_model, long_problem)
    assert tokens > CONTEXT  # the case is real
    assert f"long.jsonl: line 3: prompt is {tokens:,} tokens, over the limit of {CONTEXT - COMPLETION:,}" in line
    assert "max_position_embeddings" in line and "skip_invalid_rows" in line


def test_train_refuses_a_completion_budget_that_fills_the_context(weightless_model, tmp_path):
    proc = _train(weightless_model, "synthetic:add1?n=8", tmp_path, "max_completion_length=300")
    line = _one_error_line(proc, "train")
    assert "max_completion_length 300 leaves no room for a prompt in the model's context of 256 tokens" in line


def test_eval_refuses_a_benchmark_prompt_longer_than_the_context(weightless_model, tmp_path):
    data = tmp_path / "bench"
    data.mkdir()
    long_problem = "Compute " + " * ".join(["2"] * 400) + "."
    rows = [{"id": "short", "problem": "What is 1+1?", "answer": "2"},
            {"id": "long-one", "problem": long_problem, "answer": "0"}]
    (data / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    proc = _stapo("eval", "--model", str(weightless_model), "--benchmarks", "math500", "--data-dir", str(data),
                  "--samples", "1", "--max-new-tokens", "8", "--setting", "train", "--out", str(tmp_path / "out"),
                  "--no-progress", "--backend", "hf", cwd=tmp_path)
    line = _one_error_line(proc, "eval")
    tokens = _chat_prompt_tokens(weightless_model, long_problem)
    assert f"math500: problem 'long-one': prompt is {tokens:,} tokens, over the limit of {CONTEXT - 8:,}" in line
    assert "--max-new-tokens 8" in line
    assert not (tmp_path / "out" / "run.json").exists()


# ------------------------------------------------------------------ unreadable data


def test_train_non_utf8_file_names_file_and_line(weightless_model, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"problem": "What is 1+1?", "answer": "2"}\n{"problem": "caf\xe9 costs 3", "answer": "3"}\n')
    line = _one_error_line(_train(weightless_model, str(data), tmp_path), "train")
    assert "latin1.jsonl: line 2: not UTF-8 text (byte 0xe9" in line


def test_train_unknown_synthetic_task_names_the_known_ones(weightless_model, tmp_path):
    line = _one_error_line(_train(weightless_model, "synthetic:nonsense", tmp_path), "train")
    assert ("synthetic:nonsense: unknown synthetic task 'nonsense'; "
            "known: add1, chain3, add2, mul1, mul2, linear") in line


def test_train_duplicate_json_key_names_file_and_line(weightless_model, tmp_path):
    data = tmp_path / "dup.jsonl"
    data.write_text('{"problem": "What is 1+1?", "answer": "2"}\n{"problem": "What is 2+2?", "answer": "4", '
                    '"answer": "5"}\n', encoding="utf-8")
    line = _one_error_line(_train(weightless_model, str(data), tmp_path), "train")
    assert "dup.jsonl: line 2: key 'answer' appears twice" in line


def test_analyze_rollouts_with_non_json_metadata_names_the_file(tmp_path):
    import pyarrow.parquet as pq

    from stapo.data.rollouts import write_rollouts

    rec = {"prompt": "p", "completion": "c", "reward": 1.0, "advantage": 0.5, "token_ids": [1, 2],
           "token_texts": ["a", "b"], "logprobs": [-0.1, -0.2], "entropy": [0.5, 0.4], "collision": [0.9, 0.8],
           "s2t": [False, True]}
    path = write_rollouts(tmp_path, 3, [rec], metadata={"tau_p": 0.01}).path
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"stapo.tau_p"] = b"{not json"
    pq.write_table(table.replace_schema_metadata(meta), path)
    proc = _stapo("analyze", "tokens", "--rollouts", str(tmp_path), "--out", str(tmp_path / "report"), cwd=tmp_path)
    line = _one_error_line(proc, "analyze")
    assert f"{path}: metadata 'stapo.tau_p' is not valid JSON" in line
