"""`stapo eval` says what it will do before the model loads (one plan line) and shows progress per
finished generation batch, with tokens/s; vLLM's own bar on the vLLM backend."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from stapo.cli import main
from stapo.eval.runner import EvalConfig, Problem, plan_line


def _problems(sizes: dict[str, int]) -> dict[str, list[Problem]]:
    return {b: [Problem(b, f"{b}-{i}", f"P{i}", "1") for i in range(n)] for b, n in sizes.items()}


def test_plan_counts_benchmarks_settings_problems_and_samples():
    # the two runs, counted by hand: aime24 at the paper's k = 32 for train and nucleus,
    # plus one greedy sample: 30 * 32 * 2 + 30 = 1,950
    default = EvalConfig(model="embedded", out_dir=Path("x"), benchmarks=["aime24"])
    assert plan_line(default, _problems({"aime24": 30})) == (
        "plan: aime24 (30 problems) x settings train, nucleus, greedy x 32 samples (greedy: 1) "
        "= 1,950 samples, up to 4,096 new tokens each")
    # --limit 3 --samples 2 --max-new-tokens 64 on two benchmarks: (3 * 2 * 2 + 3) * 2 = 30
    scaled = EvalConfig(model="embedded", out_dir=Path("x"), benchmarks=["aime24", "math500"], samples=2,
                        max_new_tokens=64, limit=3)
    assert plan_line(scaled, _problems({"aime24": 3, "math500": 3})) == (
        "plan: aime24, math500 (3 problems each) x settings train, nucleus, greedy x 2 samples (greedy: 1) "
        "= 30 samples, up to 64 new tokens each")
    # the paper's k per benchmark, and a benchmark shorter than --limit
    mixed = EvalConfig(model="m", out_dir=Path("x"), benchmarks=["amc23", "math500"], settings=["nucleus"])
    assert plan_line(mixed, _problems({"amc23": 40, "math500": 7})) == (
        "plan: amc23 (40 problems), math500 (7 problems) x setting nucleus x 32 samples for amc23, "
        "4 samples for math500 = 1,308 samples, up to 4,096 new tokens each")
    greedy = EvalConfig(model="m", out_dir=Path("x"), benchmarks=["aime24"], settings=["greedy"], samples=8)
    assert plan_line(greedy, _problems({"aime24": 1})) == (
        "plan: aime24 (1 problem) x setting greedy x 1 sample (greedy) = 1 sample, up to 4,096 new tokens each")


def _write_bench(folder: Path, name: str, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{name}-{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.slow  # the embedded model generates 4 samples of 8 tokens: ~10-30 s on 2 shared cores
def test_plan_before_the_model_loads_and_progress_per_generation_batch(tmp_path, monkeypatch, capsys):
    import stapo.models
    import stapo.rewards

    # the runner imports these at call time, so it calls the wrappers
    load_model, grade_batch = stapo.models.load_model, stapo.rewards.grade_batch

    graders_at_load = []

    def loading(*args, **kwargs):
        print("\n<model loads>", file=sys.stderr)  # on its own line, also after a bar
        pool = stapo.rewards.sandbox._POOL
        graders_at_load.append(pool._live + pool._spawning)
        return load_model(*args, **kwargs)

    def grading(*args, **kwargs):
        print("\n<grading>", file=sys.stderr)
        return grade_batch(*args, **kwargs)

    monkeypatch.setattr(stapo.models, "load_model", loading)
    monkeypatch.setattr(stapo.rewards, "grade_batch", grading)
    data = _write_bench(tmp_path / "data", "math500", 3)
    assert main(["eval", "--model", "embedded", "--benchmarks", "math500", "--limit", "2", "--samples", "2",
                 "--max-new-tokens", "8", "--setting", "train", "--batch-size", "2", "--data-dir", str(data),
                 "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    events = [e.strip() for e in re.split(r"[\r\n]+", err) if e.strip()]
    plan = next(i for i, e in enumerate(events) if e.startswith("stapo eval: plan:"))
    assert events[plan] == (f"stapo eval: plan: math500 (2 problems) x setting train x 2 samples = 4 samples, "
                            f"up to 8 new tokens each; 4 to generate; backend hf; out {tmp_path / 'run'}")
    assert plan < events.index("<model loads>")
    assert graders_at_load[0] >= 1  # the grading workers start while the model loads
    # the bar: 0/4 when generation starts, then +2 per finished batch of 2, each before its grading
    steps = [(e, re.search(r"generated:.*?(\d+)/4", e)) for e in events[plan:]]
    shown = [m.group(1) if m else e for e, m in steps if m or e == "<grading>"]
    shown = [s for i, s in enumerate(shown) if i == 0 or s != shown[i - 1]]
    assert shown[:5] == ["0", "2", "<grading>", "4", "<grading>"]
    assert set(shown[5:]) <= {"4"}  # closing the bar prints its last state again
    rates = re.findall(r"math500 \[train\], ([\d.]+) tok/s", err)
    assert len(rates) >= 2 and all(float(r) > 0 for r in rates)


def test_vllm_backend_shows_vllms_own_progress(monkeypatch):
    calls = []

    class FakeLLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def generate(self, prompts, params, use_tqdm):
            calls.append(use_tqdm)
            out = types.SimpleNamespace(token_ids=[5], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams, fake.__version__ = FakeLLM, lambda **kw: kw, "fake"
    monkeypatch.setitem(sys.modules, "vllm", fake)

    class Tok:
        eos_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return "x"

    from stapo.eval.backends import SampleRequest, VLLMBackend

    request = SampleRequest((1, 2), 1.0, 1.0, 4, 0)
    for progress in (True, False):
        VLLMBackend("m", Tok(), progress=progress).generate([request])
    assert calls == [True, False]
    # stapo eval builds it with its --no-progress setting
    import stapo.eval.runner as runner
    import stapo.models

    monkeypatch.setattr(stapo.models, "load_tokenizer", lambda name: Tok())
    monkeypatch.setattr(stapo.models, "resolve_model", lambda name: name)
    for progress in (True, False):
        _, backend = runner._make_backend(EvalConfig(model="m", out_dir=Path("x"), progress=progress), "vllm")
        assert backend.progress is progress
