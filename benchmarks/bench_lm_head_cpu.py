"""CPU benchmark: per-token log-prob + entropy from hidden states, stapo vs TRL, same inputs.

Forward + backward of sum(g · logprob) with the entropy computed (detached), float32, N tokens,
hidden H, vocabulary V. Each path runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own;
"extra peak" subtracts the RSS measured right after the inputs were built. CPU seconds (process time)
are reported beside wall seconds because a shared machine inflates the wall clock.

  stapo       stapo.core.lm_head_logprobs_entropy (hidden states in, no [N, V] logits)
  stapo-dh    the same with return_collision=True, return_collision_logp=True (the statistics of the
              first-order entropy change ΔH, stapo.core.entropy_change_first_order)
  trl-fused   TRL 1.16's own head, trl.kernels.ChunkedLogProbFunction (what GRPOTrainer calls through
              `add_fused_lm_head`, with its chunk size 32768), torch tile passes on CPU
  trl-logits  the logits path: full [N, V] logits, trl.trainer.utils.selective_log_softmax and
              entropy_from_logits (TRL < 1.16 GRPOTrainer)

    python benchmarks/bench_lm_head_cpu.py                       # N=4096 V=151936 H=1024
    python benchmarks/bench_lm_head_cpu.py --tokens 256 --vocab 8192 --hidden 128   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PATHS = ("stapo", "stapo-dh", "trl-fused", "trl-logits")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(SRC))
    # Imports first, so the baseline RSS already holds the libraries and "extra peak" is the head's own.
    if args.worker in ("stapo", "stapo-dh"):
        from stapo.core.lm_head import lm_head_logprobs_entropy
    elif args.worker == "trl-fused":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    else:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) * (3.0 / h**0.5)
    targets = torch.randint(0, v, (n,))
    g = torch.randn(n)
    hidden.requires_grad_()
    weight.requires_grad_()
    base = rss_mib()

    if args.worker == "stapo":

        def run():
            return lm_head_logprobs_entropy(hidden, weight, targets, temperature=args.temperature)

    elif args.worker == "stapo-dh":

        def run():
            return lm_head_logprobs_entropy(hidden, weight, targets, temperature=args.temperature,
                                            return_collision=True, return_collision_logp=True)[:2]

    elif args.worker == "trl-fused":

        def run():
            lp, ent, *_ = ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, args.temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",)
            )
            return lp, ent

    else:

        def run():
            logits = hidden @ weight.T
            lp = selective_log_softmax(logits, targets, temperature=args.temperature)
            with torch.no_grad():
                ent = entropy_from_logits(logits / args.temperature)
            return lp, ent

    times, cpu_times = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        lp, ent = run()
        (lp * g).sum().backward()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        hidden.grad = weight.grad = None
    print(json.dumps({"path": args.worker, "seconds": min(times), "cpu_seconds": min(cpu_times),
                      "peak_mib": rss_mib(), "base_mib": base,
                      "logprob_sum": float(lp.double().sum()), "entropy_sum": float(ent.double().sum())}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(SRC))
    results = []
    for path in args.paths:
        cmd = [sys.executable, __file__, "--worker", path, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--temperature", str(args.temperature), "--reps", str(args.reps),
               "--threads", str(args.threads)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{path} failed:\n{res.stderr[-3000:]}")
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    ref = results[0]
    print(f"N={args.tokens} V={args.vocab} H={args.hidden} float32, {args.threads} thread(s), best of {args.reps}\n")
    print("| path | wall s | CPU s | peak RSS MiB | extra peak MiB | x CPU time vs first | x extra peak vs first "
          "| Σlogprob | Σentropy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        extra, ref_extra = r["peak_mib"] - r["base_mib"], ref["peak_mib"] - ref["base_mib"]
        print(f"| {r['path']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_mib']:.0f} | {extra:.0f} | "
              f"{r['cpu_seconds'] / ref['cpu_seconds']:.2f} | {extra / max(ref_extra, 1):.2f} | "
              f"{r['logprob_sum']:.4f} | {r['entropy_sum']:.4f} |")


if __name__ == "__main__":
    main()
