"""The vLLM checks, run inside the vLLM venv (.venv-vllm, built by `scripts/setup.sh vllm`) with ONE
engine start; tests/eval/test_eval_vllm.py runs this once per session from the main venv and asserts on
the JSON it writes. vLLM and verl cannot share a venv (docs/eval.md), hence the subprocess.

    python tests/eval/vllm_checks.py OUT.json WORK_DIR

Each check records raw observations (token ids, texts, counts), not verdicts: the assertions and
their tolerances live in the test file.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

BENCH = "math500"
GREEDY_PROBLEMS = 6  # first rows of math500
GREEDY_TOKENS = 48
SAMPLED_TOKENS = 24
STORE_ARGS = dict(benchmarks=[BENCH], settings=["train"], samples=2, max_new_tokens=16, limit=2)


def benchmark_dir(work: Path) -> Path:
    """The real benchmark files ($STAPO_DATA_DIR), else six tiny problems
    in the same format (a checkout without the shared data still runs every check)."""
    from stapo.data import DataError, find_benchmark_dir

    try:
        folder = find_benchmark_dir()
        if (folder / f"{BENCH}.jsonl").is_file():
            return folder
    except DataError:
        pass
    folder = work / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"synthetic-{a}-{b}", "problem": f"What is {a} + {b}?", "answer": str(a + b)}
            for a, b in [(2, 3), (17, 25), (40, 2), (9, 9), (123, 321), (7, 8)]]
    (folder / f"{BENCH}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _eval_cli(out_dir: Path, backend: str) -> int:
    from stapo.cli import main

    return main(["eval", "--model", "embedded", "--backend", backend, "--benchmarks", BENCH, "--setting", "train",
                 "--data-dir", str(STORE_ARGS["data_dir"]),
                 "--samples", str(STORE_ARGS["samples"]), "--limit", str(STORE_ARGS["limit"]),
                 "--max-new-tokens", str(STORE_ARGS["max_new_tokens"]), "--out", str(out_dir), "--no-progress"])


def _samples(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    return {f"{r['benchmark']}|{r['setting']}|{r['problem_id']}|{r['sample_idx']}":
            {k: r[k] for k in ("seed", "completion", "completion_tokens", "finish_reason", "correct")} for r in rows}


def _interrupt(out_dir: Path, keep: int) -> None:
    """What a kill mid-run leaves: the first `keep` records and a torn half line after them."""
    path = out_dir / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])
    (out_dir / "results.json").unlink()


def store_check(work: Path, backend: str, built: dict) -> dict:
    """`stapo eval` through the CLI, interrupted and resumed, against one uninterrupted run."""
    from stapo.eval.runner import EvalConfig, evaluate

    resumed, straight = work / f"store-{backend}-resumed", work / f"store-{backend}-straight"
    rc_first = _eval_cli(resumed, backend)
    assert rc_first == 0, f"stapo eval --backend {backend}: exit {rc_first}"
    _interrupt(resumed, keep=1)
    rc_resume = _eval_cli(resumed, backend)
    assert rc_resume == 0, f"stapo eval --backend {backend} (resumed): exit {rc_resume}"
    tokenizer, gen = built[backend]
    counting = _Counting(gen)
    evaluate(EvalConfig(model="embedded", out_dir=straight, progress=False, **STORE_ARGS),
             backend=counting, tokenizer=tokenizer)
    return {"rc": [rc_first, rc_resume], "resumed": _samples(resumed), "straight": _samples(straight),
            "resume_generated": built[f"{backend}_calls"][-1], "straight_generated": counting.n,
            "results_resumed": json.loads((resumed / "results.json").read_text())["results"],
            "results_straight": json.loads((straight / "results.json").read_text())["results"],
            "backend_info": json.loads((resumed / "results.json").read_text())["backend_info"]}


class _Counting:
    """A backend wrapper that counts the samples it was asked for."""

    def __init__(self, backend):
        self.backend, self.n = backend, 0
        self.name, self.info, self.batch_size = backend.name, backend.info, backend.batch_size

    def generate(self, requests):
        self.n += len(requests)
        return self.backend.generate(requests)


def greedy_check(vllm_backend, hf_model, tokenizer, prompts: list[list[int]]) -> dict:
    """Greedy completions from vLLM and from HF generate (one prompt at a time: no padding), and for
    rows that differ, HF's logits of both candidate tokens at the first differing position."""
    import torch
    from vllm import SamplingParams

    stop = vllm_backend.stop_token_ids
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, stop_token_ids=stop, seed=0)
    t0 = time.perf_counter()
    outs = vllm_backend.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    vllm_s = time.perf_counter() - t0
    vllm_ids = [[int(t) for t in o.outputs[0].token_ids] for o in outs]
    hf_ids, gaps = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([p])
            y = hf_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=GREEDY_TOKENS,
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  eos_token_id=stop, pad_token_id=stop[0])
            hf_ids.append([int(t) for t in y[0, len(p):]])
    hf_s = time.perf_counter() - t0
    with torch.inference_mode():
        for p, v, h in zip(prompts, vllm_ids, hf_ids):
            j = next((i for i, (a, b) in enumerate(zip(v, h)) if a != b), None)
            if j is None:
                gaps.append(None)
                continue
            logits = hf_model(torch.tensor([p + h[:j]])).logits[0, -1].double()
            gaps.append({"position": j, "hf_token": h[j], "vllm_token": v[j],
                         "logit_hf_token": float(logits[h[j]]), "logit_vllm_token": float(logits[v[j]]),
                         "logit_max": float(logits.max())})
    return {"vllm": vllm_ids, "hf": hf_ids, "gaps": gaps, "vllm_s": vllm_s, "hf_s": hf_s}


def sampled_check(vllm_backend, prompts: list[list[int]]) -> dict:
    """The same (prompt, seed) requests in three batch compositions, and the same prompts with other seeds."""
    from stapo.eval.backends import SampleRequest

    def req(p, seed, t, top_p):
        return SampleRequest(tuple(p), t, top_p, SAMPLED_TOKENS, seed)

    reqs = [req(p, 1000 + 10 * i + s, t, tp) for i, p in enumerate(prompts)
            for s, (t, tp) in enumerate([(1.0, 1.0), (0.7, 0.9), (1.0, 1.0)])]
    together = [list(c.token_ids) for c in vllm_backend.generate(reqs)]
    reversed_ = [list(c.token_ids) for c in vllm_backend.generate(reqs[::-1])][::-1]
    alone = [list(vllm_backend.generate([r])[0].token_ids) for r in reqs[:3]]
    other = [list(c.token_ids) for c in vllm_backend.generate([req(list(r.prompt_ids), r.seed + 1, r.temperature,
                                                                     r.top_p) for r in reqs])]
    return {"together": together, "reversed": reversed_, "alone": alone, "other_seeds": other}


def main(out_path: str, work_dir: str) -> None:
    started = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    import stapo.eval.runner as runner

    # The CLI builds each backend through the runner once; later runs reuse it (one vLLM engine).
    built: dict = {"vllm_calls": [], "hf_calls": []}
    timings: dict = {}
    real_make = runner._make_backend

    def make_once(config, name):
        if name not in built:
            t0 = time.perf_counter()
            tokenizer, backend = real_make(config, name)
            timings[f"{name}_start_s"] = time.perf_counter() - t0
            built[name] = (tokenizer, backend)
        tokenizer, backend = built[name]
        counting = _Counting(backend)
        built[f"{name}_calls"].append(0)
        orig = counting.generate

        def generate(requests):
            built[f"{name}_calls"][-1] += len(requests)
            return orig(requests)

        counting.generate = generate
        return tokenizer, counting

    runner._make_backend = make_once
    STORE_ARGS["data_dir"] = str(benchmark_dir(work))
    report: dict = {"store": {}, "data_dir": STORE_ARGS["data_dir"]}
    report["store"]["hf"] = store_check(work, "hf", built)
    report["store"]["vllm"] = store_check(work, "vllm", built)

    from stapo.data import load_benchmark
    from stapo.eval.runner import prompt_token_ids

    tokenizer, vllm_backend = built["vllm"]
    hf_model = built["hf"][1].model
    rows = load_benchmark(BENCH, data_dir=STORE_ARGS["data_dir"])[:GREEDY_PROBLEMS]
    prompts = [prompt_token_ids(tokenizer, r["problem"], "boxed") for r in rows]
    report["greedy"] = greedy_check(vllm_backend, hf_model, tokenizer, prompts)
    report["sampled"] = sampled_check(vllm_backend, prompts[:4])

    import vllm

    report["info"] = {**vllm_backend.info, "vllm_version": vllm.__version__, **timings,
                      "total_s": time.perf_counter() - started,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":  # required where vLLM spawns its engine process
    # The engine in this process: no second interpreter importing vLLM and torch (tens of seconds on a
    # busy 2-core machine). The default, spawned engine is what benchmarks/bench_generation.py runs.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM's CPU worker pins this process's OpenMP threads to one core ("auto"); HF generate in the same
    # process then crawls (minutes for 64 tokens on a shared machine). No pinning for these checks.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    main(*sys.argv[1:3])
