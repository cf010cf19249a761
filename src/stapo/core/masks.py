"""Token masks: the S2T (spurious token) mask of STAPO and the high-entropy mask of 20-Entropy.

Nothing here carries gradient: the masks are decided on detached current-policy values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from stapo.core._kernels import any_true, both, count, greater, greater_equal, less
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


def _world_size(group=None) -> int:
    """The number of ranks in `group`, 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def gather_valid(values: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a 1-D tensor of variable length from every rank (identity when not distributed)."""
    world = _world_size(group)
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
        ent = ent.detach().float()
        if _world_size(group) == 1:
            if not any_true(valid):
                return torch.tensor(float("nan"), device=ent.device)  # like quantile_linear of nothing
            return masked_quantile(ent, valid, quantile)  # the same number, without the boolean gather
        return quantile_linear(gather_valid(ent[valid], group), quantile)


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
    passed in. Returns a bool [B, T]; computed under no_grad in float32 (float64 log-probs stay float64).
    """
    return s2t_mask_with_counts(logprobs, entropy, advantages, response_mask, tau_p, tau_h,
                                tau_h_quantile).spurious


def s2t_mask_with_counts(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    response_mask,
    tau_p: float = 0.01,
    tau_h: float | torch.Tensor | None = None,
    tau_h_quantile: float = 0.05,
) -> S2TParts:
    """`s2t_mask` (same arguments and checks) with the counts engines log: an `S2TParts` with the
    bool mask `spurious`, Σ valid ∧ p < tau_p, Σ valid ∧ H < threshold, the
    number silenced and the threshold, all from the same passes."""
    lp = check_float("logprobs", logprobs, ndim=2)
    ent = check_float("entropy", entropy, ndim=2)
    check_same_shape("entropy", ent, "logprobs", lp)
    valid = check_mask("response_mask", response_mask, lp.shape)
    adv = broadcast_advantages(advantages, lp.shape)
    check_prob("tau_p", tau_p)
    with torch.no_grad():
        check_finite("logprobs", lp.detach(), valid)
        check_finite("advantages", adv, valid)
        return s2t_parts(lp, ent, adv, valid, tau_p, tau_h, tau_h_quantile)


class S2TParts(NamedTuple):
    """The S2T decision on one batch: the bool mask [B, T] and 0-d float32 counts."""

    spurious: torch.Tensor      # valid ∧ A > 0 ∧ p < tau_p ∧ H < threshold
    n_low_prob: torch.Tensor    # Σ valid ∧ p < tau_p
    n_low_entropy: torch.Tensor  # Σ valid ∧ H < threshold
    n_spurious: torch.Tensor
    threshold: torch.Tensor     # the entropy threshold in nats (-inf when no token is valid)


def s2t_parts(lp, ent, adv, valid, tau_p, tau_h, tau_h_quantile) -> S2TParts:
    """The S2T mask and its counts on shape-checked inputs (`s2t_mask`, `stapo_loss`), under no_grad.

    Four comparisons and three ANDs over [B, T] (through `_kernels`, fast on CPU) plus, for the
    quantile threshold, one selection. The entropies of the valid tokens are checked for NaN/inf
    here; log-probs and advantages are the caller's to check.
    """
    lp = lp.detach() if lp.dtype in (torch.float32, torch.float64) else lp.detach().float()
    e = ent.detach().float()
    check_finite("entropy", e, valid)
    if tau_h is None:
        check_prob("tau_h_quantile", tau_h_quantile)
        threshold, n_low_entropy = masked_quantile_and_count(e, valid, tau_h_quantile)
        if n_low_entropy is not None:  # (the top-k selection of a high quantile does not count)
            n_low_entropy = torch.tensor(float(n_low_entropy), dtype=torch.float32, device=e.device)
    else:
        threshold, n_low_entropy = _entropy_threshold(e, valid, tau_h, tau_h_quantile), None
    low_prob = both(less(lp, log_threshold(tau_p)), valid)  # p < tau_p as logprob < log(tau_p): no exp
    low_entropy = less(e, threshold)
    if n_low_entropy is None:
        n_low_entropy = count(both(low_entropy, valid))
    if adv.dim() == 2 and adv.stride(-1) == 0:  # per-sequence advantages broadcast over T: one per row
        positive = greater(adv[:, :1].contiguous(), 0.0)
    else:
        positive = greater(adv, 0.0)
    spurious = both(low_prob, low_entropy, positive)  # valid ∧ p < tau_p ∧ H < threshold ∧ A > 0
    return S2TParts(spurious, count(low_prob), n_low_entropy, count(spurious), threshold)


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


def masked_quantile_and_count(values: torch.Tensor, mask: torch.Tensor, q: float, select=None):
    """(the q-quantile of values[mask], the number of masked values strictly below it or None).

    `select`: "partition" or "topk" (default: by device).

    CPU: one introselect (numpy.partition) over the valid values, an order of magnitude faster
    than torch's topk/kthvalue there; exact, with the count from the partition. Elsewhere: partial
    selection (topk) instead of a full sort: the S2T threshold is an extreme quantile, so only a
    few percent of the values need ordering.
    """
    n = int(count(mask))
    if n == 0:
        return torch.tensor(float("-inf"), device=values.device), 0
    pos = q * (n - 1)
    lo = int(pos // 1)
    hi = min(lo + 1, n - 1)
    if (select or ("partition" if values.device.type == "cpu" else "topk")) == "partition":
        return _quantile_and_count_cpu(values, mask, n, pos, lo, hi)
    v = values.reshape(-1).float()
    m = mask.reshape(-1)
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


def _quantile_and_count_cpu(values, mask, n, pos, lo, hi):
    v = values.detach().float().cpu().numpy()  # float32 like the topk path
    # the valid values, compacted (a copy: the partition below works in place)
    a = v[mask.cpu().numpy()] if n < v.size else v.reshape(-1).copy()
    a.partition(hi)  # one kth: numpy repeats the selection for each kth it is given
    prefix = a[:hi]  # the hi smallest entries, all <= a[hi]
    v_hi = torch.tensor(float(a[hi]), dtype=torch.float32)
    v_lo = torch.tensor(float(prefix.max()), dtype=torch.float32) if lo < hi else v_hi
    threshold = v_lo + (v_hi - v_lo) * (pos - lo)  # the same float32 formula as the topk path
    t = float(threshold)  # <= a[hi]: every entry below it is in the prefix
    return threshold.to(values.device), int(np.count_nonzero(prefix < t))


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
        if not any_true(valid):
            return torch.zeros_like(valid)
        if threshold is None:
            threshold = masked_quantile(ent, valid, 1.0 - top_quantile)
        return both(valid, greater_equal(ent, threshold))
