"""Clipped policy-gradient losses, their aggregations, and the STAPO loss.

Pure functions with one shape of signature, like verl's `core_algos`: per-token tensors [B, T] in,
`(loss, metrics)` out. `loss` is the quantity to *minimize* (= -J). `metrics` are detached 0-d
float32 tensors (engines call `.item()` or all-reduce them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist

from stapo.core._checks import (
    broadcast_advantages,
    check_finite,
    check_float,
    check_mask,
    check_same_shape,
)
from stapo.core.filters import (
    FilterParams,
    S2TDecision,
    TokenFilterSpec,
    _renamed_tau_h,
    _world_size,
    get_token_filter,
    high_entropy_mask,
)
from stapo.core.loss_settings import (
    check_clip_high,
    check_clip_low,
    check_clip_ratio_c,
    check_top_entropy_quantile,
)
from stapo.core.settings import S2TSettings

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

LOG_RATIO_CLAMP = 20.0


def aggregate(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    agg: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    horizon: float | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar (verl's `agg_loss` meanings).

        token-mean:               Σ_{i,t} m ℓ / N_tok                      (DAPO; N_tok = Σ m)
        seq-mean-token-mean:      Σ_i [ Σ_t m ℓ / Σ_t m ] / N_seq          (original GRPO)
        seq-mean-token-sum:       Σ_i Σ_t m ℓ / N_seq
        seq-mean-token-sum-norm:  Σ_i Σ_t m ℓ / (N_seq · horizon)          (Dr.GRPO; horizon = T)

    N_seq counts the sequences with at least one unmasked token. `num_tokens` / `num_seqs` replace
    the local counts with global ones, so micro-batch losses *sum* to the mini-batch loss. A zero
    denominator gives a loss of exactly 0 (finite, zero gradient).
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    m = loss_mask.to(loss_mat.dtype)
    # where(), not multiplication: a masked token's gradient is exactly 0 even if its term is inf.
    masked = torch.where(loss_mask, loss_mat, torch.zeros_like(loss_mat))
    if agg == "token-mean":
        denom = m.sum() if num_tokens is None else _as_denominator("num_tokens", num_tokens, m)
        return masked.sum() / denom.clamp(min=1e-12) if bool(denom > 0) else masked.sum() * 0.0
    token_count = m.sum(dim=-1)
    seq_has_tokens = token_count > 0
    denom = seq_has_tokens.to(m.dtype).sum() if num_seqs is None else _as_denominator("num_seqs", num_seqs, m)
    if agg == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / token_count.clamp(min=1.0)
    else:
        per_seq = masked.sum(dim=-1)
    if not bool(denom > 0):
        return per_seq.sum() * 0.0
    loss = per_seq.sum() / denom
    if agg == "seq-mean-token-sum-norm":
        h = loss_mat.shape[-1] if horizon is None else float(horizon)
        if h <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        loss = loss / h
    return loss


def _as_denominator(name: str, value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.numel() != 1 or not bool(torch.isfinite(t)) or bool(t < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return t.reshape(())


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    horizon: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy loss of the GRPO family.

    Per token, with r = exp(clamp(logprobs - old_logprobs, ±20)):

        term = max( -A·r, -A·clip(r, 1 - clip_low, 1 + clip_high) )
        term = min( term, -A·clip_ratio_c )   where A < 0, when clip_ratio_c (> 1) is given (dual clip)

    then `aggregate(term, loss_mask, agg, ...)`. Everything is computed in float32.
    Metrics: clip_frac_low (r < 1-clip_low with A < 0), clip_frac_high (r > 1+clip_high with A > 0),
    clip_frac (either), ratio_mean/min/max, approx_kl (mean of old - new log-prob), num_tokens.
    """
    lp, old, adv, mask = _check_policy_inputs(logprobs, old_logprobs, advantages, loss_mask, "loss_mask")
    return _clipped_loss(lp, old, adv, mask, clip_low, clip_high, clip_ratio_c, agg, num_tokens, num_seqs, horizon)


def _check_policy_inputs(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, mask_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = check_float("logprobs", logprobs, ndim=2)
    old = check_float("old_logprobs", old_logprobs, ndim=2)
    check_same_shape("old_logprobs", old, "logprobs", lp)
    mask = check_mask(mask_name, mask, lp.shape)
    adv = broadcast_advantages(advantages, lp.shape)
    check_finite("logprobs", lp.detach(), mask)
    check_finite("old_logprobs", old, mask)
    check_finite("advantages", adv, mask)
    return lp, old, adv, mask


def _clipped_loss(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
    agg: str,
    num_tokens: float | torch.Tensor | None,
    num_seqs: float | torch.Tensor | None,
    horizon: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO-clip terms and their aggregation on already-checked inputs."""
    clip_low, clip_high = check_clip_low(clip_low), check_clip_high(clip_high)
    clip_ratio_c = check_clip_ratio_c(clip_ratio_c)
    # float32 compute for half inputs; float64 stays float64 (finite-difference checks, references).
    dt = torch.float64 if lp.dtype == torch.float64 else torch.float32
    adv = adv.to(dt)
    log_ratio = torch.clamp(lp.to(dt) - old.to(dt), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    term = torch.maximum(unclipped, clipped)
    if clip_ratio_c is not None:
        term = torch.where(adv < 0, torch.minimum(term, -adv * clip_ratio_c), term)
    loss = aggregate(term, mask, agg, num_tokens, num_seqs, horizon)

    with torch.no_grad():
        r = ratio.detach()
        n = mask.sum()
        low = (r < 1.0 - clip_low) & (adv < 0) & mask
        high = (r > 1.0 + clip_high) & (adv > 0) & mask
        n_low, n_high = low.sum(), high.sum()
        metrics = {
            "clip_frac_low": _safe_div(n_low, n),
            "clip_frac_high": _safe_div(n_high, n),
            "clip_frac": _safe_div(n_low + n_high, n),  # disjoint: A < 0 vs A > 0
            "ratio_mean": _safe_div(torch.where(mask, r, 0.0).sum(), n),
            "ratio_min": _masked_extreme(r, mask, torch.amin),
            "ratio_max": _masked_extreme(r, mask, torch.amax),
            "approx_kl": _safe_div(-torch.where(mask, log_ratio.detach(), 0.0).sum(), n),
            "num_tokens": n.float(),
        }
    return loss, metrics


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return (num.float() / den.clamp(min=1).float()).float()


def _masked_extreme(
    x: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    if not bool(mask.any()):
        return torch.ones((), device=x.device)
    fill = float("inf") if reduce is torch.amin else float("-inf")
    return reduce(x.masked_fill(~mask, fill)).float()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum()
    if not bool(n > 0):
        return torch.zeros((), device=x.device)
    return (x.float() * mask).sum() / n


ALL_RANKS = "all_ranks"  # `num_silenced`: this batch is the whole step; count its silenced tokens over `group`


# the clipped loss's settings `filtered_policy_loss` passes on (`policy_loss`'s defaults)
_CLIPPED_LOSS_DEFAULTS: dict[str, Any] = dict(clip_low=0.2, clip_high=0.2, clip_ratio_c=None, agg="token-mean",
                                              num_seqs=None, horizon=None)


class FilteredLoss(NamedTuple):
    """What `filtered_policy_loss` returns: the loss, its metrics, and the decision behind them."""

    loss: torch.Tensor       # the quantity to minimise (0-d)
    metrics: dict[str, torch.Tensor]  # 0-d float32 tensors: policy_loss's, the S2T decision's, the filter's own
    loss_mask: torch.Tensor  # bool [B, T]: the tokens that got gradient
    s2t: S2TDecision         # S2T's decision (applied where the filter applies S2T, else only measured)
    deferred: bool           # token-mean over valid tokens although S2T silenced some it could not count:
                             # the engine rescales the step by valid / (valid - silenced) (see below)


def filtered_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    entropy: torch.Tensor,
    token_filter: str | TokenFilterSpec = "s2t",
    params: FilterParams | None = None,
    *,
    decision_logprobs: torch.Tensor | None = None,
    decision_entropy: torch.Tensor | None = None,
    step_tau_h: torch.Tensor | float | None = None,
    num_valid: float | torch.Tensor | None = None,
    num_silenced: float | torch.Tensor | str | None = None,
    token_weights: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    **loss_kwargs: Any,
) -> FilteredLoss:
    """One micro-batch's loss in the GRPO family: token filter -> clipped loss -> aggregation.

        S2T:   M = A > 0 ∧ p < τ_p ∧ H < τ_h   on (decision_logprobs, decision_entropy) where S2T is applied
               (default: the current logprobs, entropy), τ_h = `step_tau_h` (over the whole step) or this batch's
        keep = the filter's loss mask: valid (none) | valid ∧ ¬M (s2t) | valid ∧ H ≥ τ_ρ (high_entropy)
        ℓ    = max(-A·w·r, -A·w·clip(r)) [dual clip where A < 0],  w = `token_weights` (e.g. IS weights, ≥ 0)
        loss = aggregate(ℓ, keep, agg, num_tokens=D, ...)

    The token-mean denominator D follows the filter's `denominator`: "valid" -> `num_valid`; "kept" ->
    `num_valid` - `num_silenced` (S2T's silenced tokens of the whole step, in the share `num_valid` is
    given in), with `num_silenced` = ALL_RANKS when this batch on every rank of `group` is the step. With
    `num_valid` None the batch is the step (its own count). With S2T applied but `num_silenced` None
    (not known before this micro-batch's loss), D = `num_valid` and `deferred` is True.
    """
    spec = token_filter if isinstance(token_filter, TokenFilterSpec) else get_token_filter(token_filter)
    lp, old, adv, valid = _check_policy_inputs(logprobs, old_logprobs, advantages, response_mask, "response_mask")
    if set(loss_kwargs) - set(_CLIPPED_LOSS_DEFAULTS):
        raise TypeError(f"unexpected keyword arguments {sorted(set(loss_kwargs) - set(_CLIPPED_LOSS_DEFAULTS))}")
    kw: dict[str, Any] = {**_CLIPPED_LOSS_DEFAULTS, **loss_kwargs}
    # 1. The token filter. S2T decides on the decision values where it is applied (else it is measured; a
    # decision_entropy left None while decision_logprobs is given is refused by the filter's checks).
    own = not spec.applies_s2t or decision_logprobs is None
    kept = spec(lp if own else cast(torch.Tensor, decision_logprobs),
                entropy if own else cast(torch.Tensor, decision_entropy),
                adv, valid, params or FilterParams(), group, step_tau_h)
    # 2. The token-mean denominator: the step's valid tokens, less the silenced ones where the filter's
    # denominator is "kept" (when their count is known; else deferred to the engine).
    deferred, num_tokens = False, cast("torch.Tensor | None", None)
    if kw["agg"] == "token-mean" and num_valid is not None:
        num_tokens = torch.as_tensor(num_valid, dtype=torch.float32)
        if spec.applies_s2t and spec.denominator == "kept":
            if isinstance(num_silenced, str) and num_silenced == ALL_RANKS:
                num_silenced = global_token_count(kept.s2t.spurious, group) / _world_size(group)
            deferred = num_silenced is None
            num_tokens = num_tokens if deferred else (num_tokens - torch.as_tensor(num_silenced)).clamp(min=0.0)
    elif kw["agg"] == "token-mean" and spec.denominator == "valid":
        num_tokens = valid.sum()
    # 3. The clipped loss over the kept tokens (weights ≥ 0 ride on the advantage: max(-rAw, -clip(r)Aw)).
    weighted = adv if token_weights is None else adv * token_weights.to(adv.dtype).expand_as(adv)
    loss, metrics = _clipped_loss(lp, old, weighted, kept.loss_mask, num_tokens=num_tokens, **kw)
    metrics.update(s2t_metrics(kept.s2t))
    if spec.uses_top_entropy_quantile:
        metrics.update(entropy_kept_count=kept.loss_mask.sum().float(),
                       entropy_kept_frac=_safe_div(kept.loss_mask.sum(), valid.sum()))
    return FilteredLoss(loss, metrics, kept.loss_mask, kept.s2t, deferred)


def stapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor,
    s2t: S2TSettings | None = None,
    step_tau_h: torch.Tensor | float | None = None,
    group: dist.ProcessGroup | None = None,
    num_tokens: float | torch.Tensor | None = None,
    **policy_loss_kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """STAPO: `filtered_policy_loss` with the "s2t" token filter.

        M   = s2t_mask(logprobs, entropy, A, response_mask, s2t, step_tau_h=step_tau_h)
        J   = 1/Σ(valid ∧ ¬M) · Σ_{valid ∧ ¬M} min(r·A, clip(r)·A)          (token-mean)

    `s2t` None: `S2TSettings()` (the paper's rule). Silenced tokens get exactly zero gradient and are not
    counted in the denominators; with a global `num_tokens` (micro-batching, several ranks) pass the
    global count of *unmasked* valid tokens. τ_h is `step_tau_h` when given (`s2t_threshold` over the
    whole optimizer step: the mini-batch scope), else the quantile over the tokens passed in (gathered
    across `group`'s ranks when distributed).
    Metrics add s2t_masked_count, s2t_masked_frac, s2t_candidates, frac_low_prob (p < tau_p),
    frac_low_entropy (H < threshold) and entropy_threshold, all over the valid tokens.
    """
    step_tau_h = _renamed_tau_h({k: policy_loss_kwargs.pop(k) for k in ("s2t_threshold",) if k in policy_loss_kwargs},
                                step_tau_h)
    out = filtered_policy_loss(logprobs, old_logprobs, advantages, response_mask, entropy, "s2t",
                               FilterParams(s2t=s2t or S2TSettings()), step_tau_h=step_tau_h, group=group,
                               num_valid=num_tokens, num_silenced=None if num_tokens is None else 0.0,
                               **policy_loss_kwargs)
    return out.loss, out.metrics


def s2t_metrics(s2t: S2TDecision) -> dict[str, torch.Tensor]:
    """The S2T decision's counts as loss metrics (0-d float32; fractions of the valid tokens)."""
    return {
        "s2t_masked_count": s2t.n_spurious,
        "s2t_masked_frac": _safe_div(s2t.n_spurious, s2t.n_valid),
        "s2t_candidates": s2t.n_candidates,
        "frac_low_prob": _safe_div(s2t.n_low_prob, s2t.n_valid),
        "frac_low_entropy": _safe_div(s2t.n_low_entropy, s2t.n_valid),
        # an empty population has no threshold; report 0 rather than -inf so logs stay finite
        "entropy_threshold": torch.nan_to_num(s2t.threshold.float(), neginf=0.0),
    }


def nonfinite_positions(response_mask: torch.Tensor, *per_token: torch.Tensor | None) -> int:
    """How many valid positions hold NaN/inf in any of `per_token` ([B, T] each; None is skipped).

    Engines check their forward with it before the loss: a non-finite forward skips the optimizer step
    (as a non-finite gradient does) instead of stopping the run with core's `ValueError`."""
    valid = response_mask.bool()
    bad = torch.zeros_like(valid)
    for x in per_token:
        if x is not None:
            bad |= ~torch.isfinite(x.detach())
    return int((bad & valid).sum())


def global_token_count(mask: object, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Σ mask over this process, all-reduced over `group` when torch.distributed is initialized.

    The `num_tokens` to pass to `policy_loss` / `stapo_loss` for micro-batch and data-parallel
    invariance: call it on the whole mini-batch's `response_mask & ~s2t` before splitting.
    """
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
    total = m.to(torch.float32).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
    return total


def high_entropy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor,
    top_entropy_quantile: float = 0.2,
    entropy_threshold: float | torch.Tensor | None = None,
    num_tokens: float | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    **policy_loss_kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """20-Entropy: `filtered_policy_loss` with the "high_entropy" token filter,

        J = 1/Σ|o_i| · Σ 1[H ≥ τ_ρ] ℓ

    only the top-ρ entropy tokens get gradient, but the token-mean denominator keeps *all* valid tokens
    (unlike STAPO's renormalisation). `entropy_threshold` overrides the (1 - ρ) quantile (over `group`'s
    ranks when distributed); `num_tokens` defaults to the number of valid tokens passed in.
    """
    lp = check_float("logprobs", logprobs, ndim=2)
    valid = check_mask("response_mask", response_mask, lp.shape)
    check_top_entropy_quantile(top_entropy_quantile)
    if entropy_threshold is not None:  # a fixed τ_ρ: keep H ≥ τ_ρ, S2T only measured
        keep = high_entropy_mask(entropy, valid, top_entropy_quantile, threshold=entropy_threshold, group=group)
        loss, metrics = policy_loss(lp, old_logprobs, advantages, keep,
                                    num_tokens=valid.sum() if num_tokens is None else num_tokens, **policy_loss_kwargs)
        metrics.update(entropy_kept_count=keep.sum().float(), entropy_kept_frac=_safe_div(keep.sum(), valid.sum()))
        return loss, metrics
    out = filtered_policy_loss(lp, old_logprobs, advantages, valid, entropy, "high_entropy",
                               FilterParams(top_entropy_quantile=top_entropy_quantile), group=group,
                               num_valid=num_tokens, **policy_loss_kwargs)
    return out.loss, out.metrics
