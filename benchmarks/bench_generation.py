"""Throughput of `stapo eval`'s pieces: HF-backend generation (batch-size sweep) and grading; and
HF against vLLM side by side.

    python benchmarks/bench_generation.py                       # embedded model, CPU; STAPO_DATA_DIR or --data-dir
    python benchmarks/bench_generation.py --batch-sizes 1,4,16 --new-tokens 64 --prompts 16
    .venv-vllm/bin/python benchmarks/bench_generation.py --vs-vllm --prompts 16 --samples 8 --new-tokens 64
    .venv-vllm/bin/python benchmarks/bench_generation.py --vs-vllm-train --train-steps 4

--vs-vllm: the same requests (prompts x samples, per-sample seeds, T = 1.0) through HFBackend and
through VLLMBackend (eager, the CPU default; and with torch.compile, vLLM's own default), each in a
fresh child process of this interpreter (the vLLM venv: scripts/setup.sh vllm). Per side: wall time
from process start to exit (imports, model load / engine start, generation), the generation time
alone, new tokens/s over the generation, and the peak RSS summed over the process tree (vLLM's
engine runs in its own process), sampled every 0.2 s. The load average before and after is printed:
on a shared machine it says how much the numbers are worth.

--vs-vllm-train: `stapo train demo` (no held-out eval, no plots) for --train-steps optimizer steps,
rollouts by HF generate (use_vllm=false) and by vLLM colocated with the trainer (use_vllm=true,
stapo.engines.trl.vllm), each as a fresh `python -m stapo train` child of this interpreter. Per
side: wall time from process start to exit (imports, model load / engine start, training, final
save), the training time (summary.json), the mean step time and rollout tokens/s = the completion
tokens of all steps / their step time (from metrics.jsonl), and the peak RSS of the process tree.

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

from stapo import rundir

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


def _side_requests(args, data_dir: Path, tok) -> list:
    from stapo.eval.backends import SampleRequest

    problems = [r["problem"] for r in read_rows(data_dir, "math500")[: args.prompts]]
    requests = []
    for i, p in enumerate(problems):
        msgs = [{"role": "user", "content": p + "\nPut your final answer in \\boxed{}."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        requests += [SampleRequest(tuple(ids), 1.0, 1.0, args.new_tokens, seed=1000 + 100 * i + j)
                     for j in range(args.samples)]
    return requests


def run_side(args, data_dir: Path) -> None:
    """One side of --vs-vllm, in its own process: load, generate, print one JSON line."""
    t0 = time.perf_counter()
    from stapo.models import load_tokenizer, resolve_model

    tok = load_tokenizer(args.model)
    requests = _side_requests(args, data_dir, tok)
    if args.side == "hf":
        import torch

        from stapo.eval.backends import HFBackend
        from stapo.models import load_model

        torch.set_num_threads(args.threads)
        backend = HFBackend(load_model(args.model), tok, batch_size=args.hf_batch_size)
    else:
        from stapo.eval.backends import VLLMBackend

        extra = {} if args.side == "vllm-eager" else {"enforce_eager": False}
        backend = VLLMBackend(resolve_model(args.model), tok, **extra)
    ready = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = backend.generate(requests)
    gen_s = time.perf_counter() - t1
    n_tok = sum(c.num_tokens for c in out)
    print("SIDE " + json.dumps({"side": args.side, "start_s": ready, "gen_s": gen_s, "new_tokens": n_tok,
                               "samples": len(out), "tokens_per_s": n_tok / gen_s}), flush=True)


def run_measured(cmd: list[str]) -> tuple[int, str, float, float]:
    """Run `cmd`; its exit code, stdout, wall seconds and the peak RSS (MB) of its process tree."""
    import subprocess

    import psutil

    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)
        return proc.returncode, proc.stdout.read(), time.perf_counter() - t0, peak / 2**20


def bench_vs_vllm(args) -> list[dict]:
    """Each side in a child process; wall time and peak RSS of its process tree."""
    import sys

    rows = []
    for side in args.sides:
        cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--data-dir", args.data_dir,
               "--prompts", str(args.prompts), "--samples", str(args.samples), "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads), "--hf-batch-size", str(args.hf_batch_size)]
        load_before = os.getloadavg()[0]
        rc, stdout, wall, peak = run_measured(cmd)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("SIDE ")), None)
        if rc != 0 or line is None:
            raise SystemExit(f"{side}: exit {rc}; rerun: {' '.join(cmd)}")
        row = {**json.loads(line[5:]), "wall_s": wall, "peak_rss_mb": peak,
               "load_before": load_before, "load_after": os.getloadavg()[0]}
        rows.append(row)
        print(f"  {side:15s} wall {wall:6.1f} s (ready after {row['start_s']:6.1f} s), generate {row['gen_s']:6.1f} s, "
              f"{row['new_tokens']} new tokens = {row['tokens_per_s']:6.1f} tok/s, "
              f"peak RSS {row['peak_rss_mb']:6.0f} MB, "
              f"load {load_before:.1f} -> {row['load_after']:.1f}", flush=True)
    return rows


def bench_train_vs_vllm(args) -> list[dict]:
    """`stapo train demo` with HF rollouts, then with vLLM rollouts, each in a child process."""
    import sys
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_vllm_") as tmp:
        for side in ("hf", "vllm"):
            out = Path(tmp) / side
            cmd = [sys.executable, "-m", "stapo", "train", "demo", f"max_steps={args.train_steps}", "eval_data=null",
                   "plots=false", f"use_vllm={'true' if side == 'vllm' else 'false'}", f"output_dir={out}"]
            load_before = os.getloadavg()[0]
            rc, _stdout, wall, peak = run_measured(cmd)
            if rc != 0:
                raise SystemExit(f"{side}: exit {rc}; rerun: {' '.join(cmd)}")
            steps = [json.loads(ln) for ln in (out / rundir.METRICS_FILE).read_text().splitlines()]
            steps = [m for m in steps if "loss" in m and "step_time" in m]
            step_s = sum(m["step_time"] for m in steps)
            tokens = sum(m["stapo/completion_tokens"] for m in steps)
            summary = json.loads((out / rundir.SUMMARY_FILE).read_text())
            row = {"side": side, "steps": len(steps), "wall_s": wall, "train_s": summary["train_seconds"],
                   "startup_s": wall - summary["train_seconds"], "step_s": step_s / len(steps),
                   "completion_tokens": tokens, "tokens_per_s": tokens / step_s, "peak_rss_mb": peak,
                   "load_before": load_before, "load_after": os.getloadavg()[0]}
            rows.append(row)
            print(f"  {side:5s} wall {wall:6.1f} s (train {row['train_s']:6.1f} s, rest {row['startup_s']:5.1f} s), "
                  f"{row['step_s']:5.1f} s/step, {tokens} completion tokens = {row['tokens_per_s']:5.1f} tok/s, "
                  f"peak RSS {peak:6.0f} MB, load {load_before:.1f} -> {row['load_after']:.1f}", flush=True)
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data-dir", default=None,
                    help="folder of the benchmark files <name>.jsonl (default: $STAPO_DATA_DIR)")
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--prompts", type=int, default=16, help="requests per batch-size run")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--grading-workers", type=int, default=None)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    ap.add_argument("--vs-vllm", action="store_true", help="HF against vLLM side by side (and no grading)")
    ap.add_argument("--sides", default="hf,vllm-eager,vllm-compiled", help="--vs-vllm: which sides to run")
    ap.add_argument("--samples", type=int, default=8, help="--vs-vllm: samples per prompt")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="--vs-vllm: HF rows per generate call")
    ap.add_argument("--vs-vllm-train", action="store_true",
                    help="`stapo train demo` with HF rollouts against vLLM rollouts (run with the vLLM venv)")
    ap.add_argument("--train-steps", type=int, default=4, help="--vs-vllm-train: optimizer steps per side")
    ap.add_argument("--side", default=None, choices=("hf", "vllm-eager", "vllm-compiled"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.vs_vllm_train:
        from stapo.data import DataError, find_benchmark_dir

        try:
            args.data_dir = str(find_benchmark_dir(args.data_dir))  # the --side children get the folder found
        except DataError as err:
            raise SystemExit(f"bench_generation: {err}") from None
    if args.side:
        return run_side(args, Path(args.data_dir))
    if args.vs_vllm_train:
        print(f"stapo train demo, {args.train_steps} steps, HF vs vLLM rollouts, {os.cpu_count()} CPUs:", flush=True)
        rows = bench_train_vs_vllm(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return None
    if args.vs_vllm:
        args.sides = args.sides.split(",")
        print(f"HF vs vLLM, model {args.model}, {args.prompts} prompts x {args.samples} samples x "
              f"{args.new_tokens} new tokens max (T = 1.0), {os.cpu_count()} CPUs:", flush=True)
        rows = bench_vs_vllm(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return None
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
