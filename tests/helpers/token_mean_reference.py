"""An independent float64 reference for one optimizer step of the GRPO family (imported by name from the
engine tests: `from token_mean_reference import ...`).

It is written from the paper's equations, not from `stapo.core`: per token r = exp(log pi_theta - log
pi_old), term = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), capped at -A c where A < 0 (dual clip);
STAPO silences M = A > 0 and p < tau_p and H < tau_h, tau_h the q-quantile of the candidates' entropies
over the whole step (linear interpolation); the step's loss is the sum of the kept tokens' terms over the
number of kept tokens of the whole step (the paper's / verl's token-mean over the mini-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Method:
    clip_low: float
    clip_high: float
    clip_ratio_c: float | None = None
    tau_p: float | None = None  # None: no S2T (GRPO)
    tau_h_quantile: float = 0.75


def _quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return -math.inf
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spurious_tokens(parts, method: Method) -> list[torch.Tensor]:
    """STAPO's silenced tokens of every part: (decision log-probs, decision entropies, advantages [B, T],
    valid) each; the quantile is over the candidates of all parts."""
    if method.tau_p is None:
        return [torch.zeros_like(valid) for *_, valid in parts]
    log_tau_p = math.log(method.tau_p)
    candidates = [valid & (adv > 0) & (lp < log_tau_p) for lp, _, adv, valid in parts]
    population = [float(h) for (_, ent, _, _), cand in zip(parts, candidates) for h in ent[cand].tolist()]
    tau_h = _quantile(population, method.tau_h_quantile)
    return [cand & (ent < tau_h) for (_, ent, _, _), cand in zip(parts, candidates)]


def step_loss(logprobs, old_logprobs, advantages, valid, spurious, method: Method) -> torch.Tensor:
    """The step's loss (float64, differentiable through `logprobs`): lists over its micro-batches."""
    total = torch.zeros((), dtype=torch.float64)
    kept_count = 0
    for lp, old, adv, v, spur in zip(logprobs, old_logprobs, advantages, valid, spurious):
        kept = v & ~spur
        ratio = torch.exp(lp - old.double())
        a = adv.double()
        term = torch.maximum(-a * ratio, -a * ratio.clamp(1 - method.clip_low, 1 + method.clip_high))
        if method.clip_ratio_c is not None:
            term = torch.where(a < 0, torch.minimum(term, -a * method.clip_ratio_c), term)
        total = total + torch.where(kept, term, torch.zeros_like(term)).sum()
        kept_count += int(kept.sum())
    return total / max(kept_count, 1)
