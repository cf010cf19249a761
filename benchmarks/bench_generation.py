"""Throughput of `stapo eval`'s pieces: HF-backend generation (batch-size sweep) and grading.

    python benchmarks/bench_generation.py                       # embedded model, CPU
    python benchmarks/bench_generation.py --batch-sizes 1,4,16 --new-tokens 64 --prompts 16

Generation: the embedded model (SmolLM2-135M-Instruct, fp32) through `HFBackend` at T = 1.0,
top-p = 1.0; MATH500 problems rendered with the model's chat template; every batch size generates
the same requests (same seeds), so the rows compare side by side. Reported: new tokens/s (all
generated tokens, up to end-of-sequence), samples/s, and the ratio to batch size 1.
Grading: `stapo.rewards.grade_batch` on every row of the six benchmark files, once with a correct
completion (`... \\boxed{gold}`) and once with a wrong one; reported items/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
BENCHMARK_FILES = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")


def read_rows(data_dir: Path, name: str) -> list[dict]:
    with open(data_dir / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def bench_generation(args, data_dir: Path) -> list[dict]:
    import torch

    from stapo.eval.backends import HFBackend, SampleRequest
    from stapo.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model)
    problems = [r["problem"] for r in read_rows(data_dir, "math500")[: args.prompts]]
    requests = []
    for i, p in enumerate(problems):
        msgs = [{"role": "user", "content": p + "\nPut your final answer in \\boxed{}."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        requests.append(SampleRequest(tuple(ids), 1.0, 1.0, args.new_tokens, seed=1000 + i))
    rows = []
    HFBackend(model, tok, batch_size=1).generate(requests[:1])  # warm-up
    for bs in args.batch_sizes:
        backend = HFBackend(model, tok, batch_size=bs)
        t0 = time.perf_counter()
        out = backend.generate(requests)
        dt = time.perf_counter() - t0
        n_tok = sum(c.num_tokens for c in out)
        rows.append({"batch_size": bs, "seconds": dt, "new_tokens": n_tok, "tokens_per_s": n_tok / dt,
                     "samples_per_s": len(out) / dt, "threads": torch.get_num_threads()})
        print(f"  batch {bs:3d}: {dt:7.2f} s, {n_tok} new tokens, {n_tok / dt:7.1f} tok/s, "
              f"{len(out) / dt:5.2f} samples/s", flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["tokens_per_s"] / base
    return rows


def bench_grading(data_dir: Path, workers: int | None) -> list[dict]:
    from stapo.rewards import grade_batch, warmup

    warmup(1)
    rows = []
    for name in BENCHMARK_FILES:
        data = read_rows(data_dir, name)
        golds = [r["answer"] for r in data]
        for label, completions in (
            ("correct", [f"Reasoning...\nThe final answer is \\boxed{{{g}}}." for g in golds]),
            ("wrong", ["Reasoning...\nThe final answer is \\boxed{\\frac{12345}{7}}." for _ in golds]),
        ):
            t0 = time.perf_counter()
            verdicts = grade_batch(completions, golds, workers=workers)
            dt = time.perf_counter() - t0
            rows.append({"benchmark": name, "case": label, "items": len(golds), "seconds": dt,
                         "items_per_s": len(golds) / dt, "accuracy": sum(verdicts) / len(verdicts)})
            print(f"  {name:14s} {label:7s}: {len(golds):4d} items in {dt:6.2f} s = {len(golds) / dt:8.1f} items/s "
                  f"(accuracy {100 * sum(verdicts) / len(verdicts):.1f}%)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--prompts", type=int, default=16, help="requests per batch-size run")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--grading-workers", type=int, default=None)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    data_dir = Path(args.data_dir)
    if not (data_dir / "math500.jsonl").is_file():
        raise SystemExit(f"no benchmark files in {data_dir} (use --data-dir)")
    import torch

    torch.set_num_threads(args.threads)
    result = {"generation": None, "grading": None}
    if not args.skip_generation:
        print(f"HF generation, model {args.model}, {args.prompts} prompts x {args.new_tokens} new tokens max, "
              f"{args.threads} threads:", flush=True)
        result["generation"] = bench_generation(args, data_dir)
    print("grading (stapo.rewards.grade_batch):", flush=True)
    result["grading"] = bench_grading(data_dir, args.grading_workers)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
