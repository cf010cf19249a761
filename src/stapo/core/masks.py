"""Token masks: the S2T (spurious token) mask of STAPO and the high-entropy mask of 20-Entropy.

Nothing here carries gradient: the masks are decided on detached current-policy values.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from stapo.core._checks import (
    broadcast_advantages,
    check_finite,
    check_float,
    check_mask,
    check_prob,
    check_same_shape,
)


def quantile_linear(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation, as `torch.quantile(..., "linear")`.

    Sort-based, so it has no input-size limit (torch.quantile refuses > 2**24 elements, which a
    gathered multi-rank batch can exceed). Returns a float32 0-d tensor; NaN for an empty input.
    """
    v = values.reshape(-1)
    if v.numel() == 0:
        return torch.tensor(float("nan"), device=v.device)
    return masked_quantile(v, torch.ones_like(v, dtype=torch.bool), q)


def gather_valid(values: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a 1-D tensor of variable length from every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    world = dist.get_world_size(group)
    if world == 1:
        return values
    n = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), device=values.device, dtype=values.dtype)
    padded[: values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def entropy_quantile(
    entropy: torch.Tensor, response_mask, quantile: float, group=None
) -> torch.Tensor:
    """The `quantile` of the entropies of the valid tokens, over every rank of `group` when distributed.

    Engines call this once per (mini-)batch and pass the result to `s2t_mask` as `tau_h`, so the
    threshold is the same for every micro-batch and every rank.
    """
    ent = check_float("entropy", entropy)
    valid = check_mask("response_mask", response_mask, ent.shape)
    check_prob("quantile", quantile)
    with torch.no_grad():
        return quantile_linear(gather_valid(ent.detach()[valid].float(), group), quantile)


def s2t_mask(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    response_mask,
    tau_p: float = 0.01,
    tau_h: float | torch.Tensor | None = None,
    tau_h_quantile: float = 0.05,
) -> torch.Tensor:
    """Spurious-token mask of STAPO (True = spurious, silenced):

        M_t = valid_t  ∧  A_t > 0  ∧  exp(logprob_t) < tau_p  ∧  H_t < tau_h

    `logprobs`, `entropy`: the current policy's per-token values [B, T]; `advantages` [B] or [B, T];
    `response_mask` [B, T] (bool or 0/1). `tau_h` is an absolute entropy threshold in nats; when it
    is None the threshold is the `tau_h_quantile` quantile (linear) of the valid tokens' entropies
    passed in. Returns a bool [B, T]; computed in float32 under no_grad.
    """
    lp = check_float("logprobs", logprobs, ndim=2)
    ent = check_float("entropy", entropy, ndim=2)
    check_same_shape("entropy", ent, "logprobs", lp)
    valid = check_mask("response_mask", response_mask, lp.shape)
    adv = broadcast_advantages(advantages, lp.shape)
    check_prob("tau_p", tau_p)
    with torch.no_grad():
        lp = lp.detach().float()
        ent = ent.detach().float()
        check_finite("logprobs", lp, valid)
        check_finite("entropy", ent, valid)
        check_finite("advantages", adv, valid)
        threshold = _entropy_threshold(ent, valid, tau_h, tau_h_quantile)
        return (lp < log_threshold(tau_p)) & (ent < threshold) & (adv > 0) & valid


def log_threshold(tau_p: float) -> float:
    """log(tau_p) in float64: p = exp(logprob) < tau_p  <=>  logprob < log(tau_p)."""
    return math.log(tau_p) if tau_p > 0 else float("-inf")


def _entropy_threshold(ent, valid, tau_h, tau_h_quantile) -> torch.Tensor:
    if tau_h is not None:
        t = torch.as_tensor(tau_h, dtype=torch.float32, device=ent.device)
        if t.numel() != 1 or not bool(torch.isfinite(t)):
            raise ValueError(f"tau_h must be a finite number (nats), got {tau_h!r}")
        return t.reshape(())
    check_prob("tau_h_quantile", tau_h_quantile)
    return masked_quantile(ent, valid, tau_h_quantile)


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """`quantile_linear(values[mask], q)` without materialising values[mask]; -inf if mask is empty."""
    return masked_quantile_and_count(values, mask, q)[0]


def masked_quantile_and_count(values: torch.Tensor, mask: torch.Tensor, q: float):
    """(the q-quantile of values[mask], the number of masked values strictly below it or None).

    Partial selection (topk) instead of a full sort: the S2T threshold is an extreme quantile, so
    only a few percent of the values need ordering. The count comes for free from the selection
    when the quantile is in the lower half (None otherwise: count it with a comparison).
    """
    n = int(mask.sum())
    if n == 0:
        return torch.tensor(float("-inf"), device=values.device), 0
    v = values.reshape(-1).float()
    m = mask.reshape(-1)
    pos = q * (n - 1)
    lo = int(pos // 1)
    hi = min(lo + 1, n - 1)
    if hi + 1 <= n - lo:  # near the bottom: the hi+1 smallest valid values (invalid pushed to +inf)
        if n < v.numel():
            v = v.masked_fill(~m, float("inf"))
        sel = torch.topk(v, hi + 1, largest=False, sorted=True).values
        threshold = sel[lo] + (sel[hi] - sel[lo]) * (pos - lo)
        # every valid value below the threshold (<= sel[hi]) is among the selected ones
        return threshold, int(torch.searchsorted(sel, threshold.reshape(1)).item())
    if n < v.numel():  # near the top: the n-lo largest valid values (invalid pushed to -inf)
        v = v.masked_fill(~m, float("-inf"))
    sel = torch.topk(v, n - lo, largest=True, sorted=True).values
    v_lo, v_hi = sel[-1], sel[n - 1 - hi]
    return v_lo + (v_hi - v_lo) * (pos - lo), None


def high_entropy_mask(
    entropy: torch.Tensor,
    response_mask,
    top_quantile: float = 0.2,
    threshold: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """20-Entropy's mask (True = keep): valid tokens with H >= the (1 - top_quantile) quantile of the
    valid tokens' entropies, i.e. the top `top_quantile` fraction of the batch by entropy.

    `threshold` overrides the local quantile (engines pass a global one from `entropy_quantile`)."""
    ent = check_float("entropy", entropy)
    valid = check_mask("response_mask", response_mask, ent.shape)
    check_prob("top_quantile", top_quantile)
    with torch.no_grad():
        ent = ent.detach().float()
        check_finite("entropy", ent, valid)
        if not bool(valid.any()):
            return torch.zeros_like(valid)
        if threshold is None:
            threshold = masked_quantile(ent, valid, 1.0 - top_quantile)
        return valid & (ent >= torch.as_tensor(threshold, dtype=torch.float32, device=ent.device))
