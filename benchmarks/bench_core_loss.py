"""stapo_loss vs policy_loss: the cost of the S2T mask, measured side by side.

    python benchmarks/bench_core_loss.py [--B 64] [--T 2048] [--reps 30]

Both losses get the same inputs (entropy precomputed, as engines have it); each repetition times
forward + backward of each, interleaved in a shuffled order so drift affects all paths alike. Prints
median times and the ratio stapo/policy (goal on CPU: <= 1.05): paired (median over repetitions of
the ratio within a repetition), of the medians, and of the minima.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from stapo.core import S2TSettings, policy_loss, stapo_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T = args.B, args.T
    # Rollout-like log-probs: most tokens confident, ~3% below p = 0.01 (so the S2T mask silences some)
    old = -torch.rand(B, T, generator=g) * 3
    rare = torch.rand(B, T, generator=g) < 0.03
    old = torch.where(rare, -4.7 - 4 * torch.rand(B, T, generator=g), old)
    lp0 = old + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    ent = torch.rand(B, T, generator=g) * 2
    mask = torch.ones(B, T, dtype=torch.bool)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask &= torch.arange(T)[None, :] < lengths[:, None]

    def run_policy():
        lp = lp0.clone().requires_grad_()
        loss, _ = policy_loss(lp, old, adv, mask, clip_high=0.28)
        loss.backward()

    def run_stapo(**kw):
        lp = lp0.clone().requires_grad_()
        loss, _ = stapo_loss(lp, old, adv, mask, ent, S2TSettings(**kw), clip_high=0.28)
        loss.backward()

    cases = {
        "policy_loss": run_policy,
        "stapo_loss (tau_h quantile 0.75)": lambda: run_stapo(),
        "stapo_loss (absolute tau_h)": lambda: run_stapo(tau_h=0.5),
    }
    for fn in cases.values():  # warm-up
        fn()
    times = {k: [] for k in cases}
    order = random.Random(0)
    for _ in range(args.reps):  # one repetition = each path once, in a shuffled order
        keys = list(cases)
        order.shuffle(keys)
        for k in keys:
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["policy_loss"])
    print(f"B={B} T={T} valid tokens={int(mask.sum())} threads={torch.get_num_threads()} reps={args.reps}")
    for k, kw in (("quantile", {}), ("absolute", dict(tau_h=0.5))):
        _, m = stapo_loss(lp0, old, adv, mask, ent, S2TSettings(**kw))
        print(f"S2T ({k} tau_h): masked {int(m['s2t_masked_count'])} tokens ({float(m['s2t_masked_frac']):.2%}),"
              f" p < tau_p {float(m['frac_low_prob']):.2%}, H < {float(m['entropy_threshold']):.3f}: "
              f"{float(m['frac_low_entropy']):.2%}")
    best = min(times["policy_loss"])
    # Paired: the ratio within each repetition, then the median over repetitions (drift of a shared
    # or virtualised CPU hits both paths of a repetition alike); min: the least disturbed repetition.
    print("| path | median fwd+bwd (ms) | median of paired ratios | ratio of medians | min (ms) | ratio of mins |")
    print("|---|---|---|---|---|---|")
    for k, ts in times.items():
        m, lo = statistics.median(ts), min(ts)
        paired = statistics.median(t / b for t, b in zip(ts, times["policy_loss"]))
        print(f"| {k} | {m * 1e3:.2f} | {paired:.3f} | {m / base:.3f} | {lo * 1e3:.2f} | {lo / best:.3f} |")


if __name__ == "__main__":
    main()
