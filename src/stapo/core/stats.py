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


def token_fractions(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
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


def entropy_change_first_order(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    collision: torch.Tensor,
    collision_logp: torch.Tensor,
    advantages: torch.Tensor | float,
    step_size: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """First-order change of a position's entropy under the update of its own sampled token.

    With π = softmax(u), u = z / T the tempered logits, sampled token a of probability p = π(a),
    advantage A and a step of size η on the raw logits z along ∇_z (A log π(a)) = A (e_a − π) / T,
    and ∂H/∂u_k = −π_k (log π_k + H):

        ΔH ≈ −(η / T²) · A · [ p (log p + H) − Σ_k π_k² (log π_k + H) ]
           = −(η / T²) · A · [ p (log p + H) − Σπ² log π − H Σπ² ]

    `collision` is Σπ² and `collision_logp` is Σπ² log π (both from `token_logprobs_entropy` /
    `lm_head_logprobs_entropy` with `return_collision=True, return_collision_logp=True`).
    `advantages` broadcasts against the per-token tensors (a per-sequence A as [B, 1]).

    Sign: A > 0 on a rare token (p small, so p (log p + H) ≈ 0) at a confident position gives
    ΔH ≈ −A Σπ² (log π + H) > 0 when the dominant token has log π + H < 0, i.e. the entropy rises.
    Returned in float64 (the bracket is a difference of comparable terms for peaked rows).
    """
    if not step_size == step_size or not temperature > 0:
        raise ValueError(f"step_size must be a number and temperature > 0, got {step_size}, {temperature}")
    lp = logprobs.detach().double()
    h = entropy.detach().double()
    bracket = lp.exp() * (lp + h) - collision_logp.detach().double() - h * collision.detach().double()
    adv = torch.as_tensor(advantages, dtype=torch.float64, device=lp.device)
    return -(float(step_size) / float(temperature) ** 2) * adv * bracket
