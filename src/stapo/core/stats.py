"""Token statistics: what S2T looks at, and why spurious tokens carry large gradients.

For a softmax policy with logits z and sampled token a of probability p = π(a):

    ∇_z log π(a) = e_a − π,   ‖∇_z log π(a)‖² = 1 − 2p + Σ_j π_j²

Σ_j π_j² is the collision probability (≥ exp(−H)); the norm approaches 2 when p → 0 while the
mass sits on another token (low entropy) — the spurious-token regime.
"""

from __future__ import annotations

import torch

from stapo.core._checks import check_mask


def grad_norm_proxy(logprobs: torch.Tensor, collision: torch.Tensor) -> torch.Tensor:
    """‖∇_z log π(a)‖² = 1 − 2p + Σπ² from per-token log-prob and collision probability."""
    return 1.0 - 2.0 * logprobs.float().exp() + collision.float()


def masked_summary(values: torch.Tensor, mask) -> dict[str, float]:
    """mean / min / max / count of `values` over the True positions of `mask`."""
    m = check_mask("mask", mask, values.shape)
    v = values.detach().float()[m]
    if v.numel() == 0:
        return {"mean": 0.0, "min": 0.0, "max": 0.0, "count": 0}
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "count": int(v.numel())}


def token_fractions(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    response_mask,
    tau_p: float,
    entropy_threshold: float,
    spurious: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fractions of the valid tokens with p < tau_p, with H < threshold, and in the S2T set."""
    valid = check_mask("response_mask", response_mask, logprobs.shape)
    n = int(valid.sum())
    if n == 0:
        return {"frac_low_prob": 0.0, "frac_low_entropy": 0.0, "s2t_frac": 0.0, "valid_tokens": 0}
    lp = logprobs.detach().float()
    ent = entropy.detach().float()
    out = {
        "frac_low_prob": float(((lp.exp() < tau_p) & valid).sum()) / n,
        "frac_low_entropy": float(((ent < entropy_threshold) & valid).sum()) / n,
        "valid_tokens": n,
    }
    if spurious is not None:
        out["s2t_frac"] = float((spurious & valid).sum()) / n
    return out
