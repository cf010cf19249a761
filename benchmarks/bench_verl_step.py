"""One PPO mini-batch through verl's real FSDP engine on a CPU: the plugin's `stapo` loss with the S2T
decision on the current policy (`decision_policy=current`: a forward-only pre-pass over the mini-batch
when it has several micro-batches) and on the old one (`old`: pi_old's values from the actor batch, no
pre-pass) against verl's own `vanilla` loss (GRPO), on the same engine and batch.

What is timed: `engine.train_batch` (the micro-batches' forward/backward, the pre-pass where there is one,
the optimizer step) with the loss function verl's engine worker binds. Not timed: verl's old-log-prob
pass, which computes entropies for every loss mode (the driver logs them), so `old` adds nothing there.
The engine harness is the one the plugin's tests use (tests/helpers/verl_engine.py: verl 0.9.1's FSDP2
engine, one gloo rank, fp32). Interleaved runs, medians compared.

    python benchmarks/bench_verl_step.py [--hidden 64] [--layers 2] [--vocab 4096] [--responses 16]
                                         [--micro-batch 4] [--response-len 64] [--repeats 5] [--json OUT]

Goal: `old` <= 1.03 against `vanilla`; `current`'s cost recorded beside it. Wall and CPU time (of this
process) are both reported; on a shared machine the CPU-time ratio is the steadier one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--responses", type=int, default=16, help="responses per mini-batch (groups of 4)")
    ap.add_argument("--micro-batch", type=int, default=4, help="responses per micro-batch")
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the medians and ratios to this file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path[:0] = [str(TESTS / "helpers")]  # the engine harness the plugin's tests use
    from verl.workers.utils.padding import no_padding_2_padding
    from verl_engine import actor_loss, build_engine, make_batch, tiny_qwen3, to_actor_batch, verl_on_cpu
    from verl_fakes import make_actor_config

    from stapo.engines.verl.losses import OLD_ENTROPY_KEY

    model_dir = tiny_qwen3(Path(tempfile.mkdtemp(prefix="bench_verl_step_")), hidden=args.hidden, layers=args.layers,
                           vocab=args.vocab, max_positions=args.response_len + 16, head_scale=4.0)
    padded = make_batch(groups=args.responses // 4, group_size=4, prompt_len=8, response_len=args.response_len,
                        vocab=args.vocab)
    configs = {
        "vanilla": make_actor_config("vanilla"),
        "stapo current": make_actor_config("stapo", stapo={"decision_policy": "current"}),
        "stapo old": make_actor_config("stapo", stapo={"decision_policy": "old"}),
    }
    with verl_on_cpu():
        engine = build_engine(model_dir, lr=0.0)
        with engine.train_mode():  # verl's old-log-prob pass: log-probs and entropies of the whole batch
            td = to_actor_batch(padded, torch.zeros(padded["response_mask"].shape), micro_batch_size=args.micro_batch)
            out = engine.infer_batch(td)
            old = no_padding_2_padding(out["model_output"]["log_probs"], td).float()
            old_entropy = no_padding_2_padding(out["model_output"]["entropy"], td).float()
        valid = padded["response_mask"].bool()
        old = torch.where(valid, old, torch.zeros_like(old))

        def timed(name) -> tuple[float, float]:
            extra = {OLD_ENTROPY_KEY: old_entropy} if name == "stapo old" else {}
            data = to_actor_batch(dict(padded, **extra), old, micro_batch_size=args.micro_batch)
            with engine.train_mode():  # (wall, CPU) seconds: CPU time is the steadier one on a shared machine
                t0, c0 = time.perf_counter(), time.process_time()
                engine.train_batch(data, loss_function=actor_loss(configs[name]))
                return time.perf_counter() - t0, time.process_time() - c0

        names = list(configs)
        for name in names:  # warm-up
            timed(name)
        times = {name: [] for name in names}
        for i in range(args.repeats):
            for name in names[i % len(names):] + names[: i % len(names)]:
                times[name].append(timed(name))
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    tokens = int(valid.sum())
    print(f"random Qwen3 (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}); one PPO mini-batch of "
          f"{args.responses} responses ({tokens} valid tokens) in micro-batches of {args.micro_batch}; verl FSDP2 "
          f"engine on the CPU, {args.threads} threads, {args.repeats} repeats")
    for name in names:
        print(f"  {name:14s} median wall {med[name] * 1e3:9.1f} ms   CPU {cpu[name] * 1e3:9.1f} ms")
    ratios = {f"{name} / vanilla": {"wall": med[name] / med["vanilla"], "cpu": cpu[name] / cpu["vanilla"]}
              for name in ("stapo current", "stapo old")}
    for name, value in ratios.items():
        print(f"  {name:24s} wall {value['wall']:.3f}   CPU {value['cpu']:.3f}")
    old = ratios["stapo old / vanilla"]["cpu"]
    print(f"goal: stapo old / vanilla <= 1.03 (CPU time): {'met' if old <= 1.03 else 'NOT met'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "median_wall_s": med, "median_cpu_s": cpu, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
