"""Token filters: which valid tokens of a batch get gradient. A registry of pure functions with one
signature, like verl's `core_algos` policy losses:

    filter(logprobs, entropy, advantages, response_mask, params, group=None) -> FilterResult

    none          loss mask = valid                                     (GRPO, DAPO, Dr.GRPO, JustRL)
    s2t           loss mask = valid ∧ ¬M,  M = A > 0 ∧ p < τ_p ∧ H < τ_h  (STAPO)
    high_entropy  loss mask = valid ∧ H ≥ τ_ρ, τ_ρ = (1 − ρ)-quantile    (20-Entropy)

`logprobs`, `entropy`: the current policy's per-token values [B, T]; `advantages` [B] or [B, T];
`response_mask` [B, T] (bool or 0/1); `params` a `FilterParams`. Every filter also returns the S2T
decision on the batch (what STAPO would silence), so runs of every method log the same diagnostics.
Entropy quantiles are taken over the tokens passed in, gathered across the ranks of `group` when
torch.distributed is initialised. Nothing here carries gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

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
from stapo.core.settings import S2TSettings

# ---- quantiles -------------------------------------------------------------------------------


def quantile_linear(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a tensor's values with linear interpolation, as `torch.quantile(..., "linear")`,
    without its 2**24-element limit (a gathered multi-rank batch can exceed it). float32 0-d; NaN if empty."""
    v = values.detach().reshape(-1).float()
    n = v.numel()
    if n == 0:
        return torch.tensor(float("nan"), device=v.device)
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(v, lo + 1).values
    v_hi = torch.kthvalue(v, hi + 1).values if hi != lo else v_lo
    return torch.lerp(v_lo, v_hi, torch.tensor(pos - lo, dtype=torch.float32, device=v.device))


def _world_size(group=None) -> int:
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


def entropy_quantile(entropy: torch.Tensor, population, quantile: float, group=None) -> torch.Tensor:
    """The `quantile` of `entropy` over the True positions of `population`, over every rank of `group`
    when distributed. float32 0-d; NaN when the population is empty on every rank."""
    ent = check_float("entropy", entropy)
    pop = check_mask("population", population, ent.shape)
    check_prob("quantile", quantile)
    with torch.no_grad():
        return quantile_linear(gather_valid(ent.detach().float()[pop], group), quantile)


# ---- the S2T decision ------------------------------------------------------------------------


class S2TDecision(NamedTuple):
    """STAPO's spurious-token decision on one batch; counts are 0-d float32 tensors (local, not reduced)."""

    spurious: torch.Tensor       # bool [B, T]: valid ∧ A > 0 ∧ p < τ_p ∧ H < threshold
    threshold: torch.Tensor      # τ_h in nats; -inf when its population is empty (nothing silenced)
    n_valid: torch.Tensor
    n_low_prob: torch.Tensor     # valid ∧ p < τ_p
    n_low_entropy: torch.Tensor  # valid ∧ H < threshold
    n_candidates: torch.Tensor   # valid ∧ p < τ_p ∧ A > 0
    n_spurious: torch.Tensor
    candidates: torch.Tensor     # bool [B, T]: valid ∧ p < τ_p ∧ A > 0 (what some τ_h could silence)


def s2t_decision(logprobs, entropy, advantages, response_mask, settings: S2TSettings, group=None) -> S2TDecision:
    """The S2T mask and its counts (checked inputs; see the module docstring for shapes).

        low_prob   = valid ∧ p < τ_p           (as logprob < log τ_p: no exp)
        candidate  = low_prob ∧ A > 0
        τ_h        = settings.tau_h, or min(tau_h_max, the tau_h_quantile of the entropies of
                     valid | low_prob | candidate  (settings.tau_h_population))
        M          = candidate ∧ H < τ_h
    """
    lp = check_float("logprobs", logprobs, ndim=2)
    ent = check_float("entropy", entropy, ndim=2)
    check_same_shape("entropy", ent, "logprobs", lp)
    valid = check_mask("response_mask", response_mask, lp.shape)
    adv = broadcast_advantages(advantages, lp.shape)
    with torch.no_grad():
        lp = lp.detach() if lp.dtype == torch.float64 else lp.detach().float()
        e = ent.detach().float()
        check_finite("logprobs", lp, valid)
        check_finite("entropy", e, valid)
        check_finite("advantages", adv, valid)
        log_tau_p = math.log(settings.tau_p) if settings.tau_p > 0 else -math.inf
        low_prob = valid & (lp < log_tau_p)
        candidate = low_prob & (adv > 0)
        if settings.tau_h is not None:
            threshold = torch.tensor(settings.tau_h, dtype=torch.float32, device=e.device)
        else:
            population = {"valid": valid, "low_prob": low_prob, "candidates": candidate}[settings.tau_h_population]
            threshold = entropy_quantile(e, population, settings.tau_h_quantile, group)
            if torch.isnan(threshold):  # an empty population: nothing is silenced
                threshold = torch.tensor(float("-inf"), device=e.device)
            threshold = torch.clamp(threshold, max=settings.tau_h_max)
        low_entropy = valid & (e < threshold)
        spurious = candidate & low_entropy
        n = lambda m: m.sum(dtype=torch.float32)  # noqa: E731
        return S2TDecision(spurious, threshold, n(valid), n(low_prob), n(low_entropy), n(candidate), n(spurious),
                           candidate)


def tau_h_for_fraction(entropy, candidates, n_valid, target: float) -> float | None:
    """The smallest absolute τ_h (nats) under which at least `target` · n_valid of the `candidates`
    (valid ∧ p < τ_p ∧ A > 0) have H < τ_h: just above the k-th smallest candidate entropy,
    k = ⌈target · n_valid⌉ (the mask's "<" is strict). None when fewer than k candidates exist."""
    ent = entropy.detach().float()[check_mask("candidates", candidates, entropy.shape)]
    k = max(1, math.ceil(target * float(n_valid) - 1e-9))
    if ent.numel() < k:
        return None
    kth = torch.kthvalue(ent, k).values
    return float(torch.nextafter(kth, torch.tensor(float("inf"))))


def high_entropy_threshold(entropy, valid, top_quantile: float, group=None) -> torch.Tensor:
    """20-Entropy's τ_ρ: the (1 − ρ) quantile of the valid tokens' entropies (+inf when none is valid)."""
    check_prob("top_quantile", top_quantile)
    t = entropy_quantile(entropy, valid, 1.0 - top_quantile, group)
    return torch.nan_to_num(t, nan=float("inf"))


# ---- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterParams:
    """What the token filters read: the S2T settings and 20-Entropy's ρ."""

    s2t: S2TSettings = field(default_factory=S2TSettings)
    top_entropy_quantile: float = 0.2


class FilterResult(NamedTuple):
    loss_mask: torch.Tensor  # bool [B, T]: the tokens that get gradient (⊆ valid)
    s2t: S2TDecision         # measured for every filter; applied only by "s2t"


TokenFilter = Callable[..., FilterResult]
TOKEN_FILTERS: dict[str, TokenFilter] = {}


def register_token_filter(name: str):
    def decorator(fn: TokenFilter) -> TokenFilter:
        TOKEN_FILTERS[name] = fn
        return fn

    return decorator


def get_token_filter(name: str) -> TokenFilter:
    try:
        return TOKEN_FILTERS[name]
    except KeyError:
        raise ValueError(f"unknown token filter {name!r}; known: {', '.join(TOKEN_FILTERS)}") from None


def apply_token_filter(name, logprobs, entropy, advantages, response_mask, params: FilterParams | None = None,
                       group=None) -> FilterResult:
    """`TOKEN_FILTERS[name](...)`: the one place engines and analyze decide which tokens learn."""
    return get_token_filter(name)(logprobs, entropy, advantages, response_mask, params or FilterParams(), group)


@register_token_filter("none")
def keep_valid(logprobs, entropy, advantages, response_mask, params: FilterParams, group=None) -> FilterResult:
    """loss mask = valid."""
    s2t = s2t_decision(logprobs, entropy, advantages, response_mask, params.s2t, group)
    return FilterResult(check_mask("response_mask", response_mask, logprobs.shape), s2t)


@register_token_filter("s2t")
def silence_spurious(logprobs, entropy, advantages, response_mask, params: FilterParams, group=None) -> FilterResult:
    """STAPO: loss mask = valid ∧ ¬M with M = A > 0 ∧ p < τ_p ∧ H < τ_h (`s2t_decision`)."""
    s2t = s2t_decision(logprobs, entropy, advantages, response_mask, params.s2t, group)
    valid = check_mask("response_mask", response_mask, logprobs.shape)
    return FilterResult(valid & ~s2t.spurious, s2t)


@register_token_filter("high_entropy")
def keep_high_entropy(logprobs, entropy, advantages, response_mask, params: FilterParams, group=None) -> FilterResult:
    """20-Entropy: loss mask = valid ∧ H ≥ τ_ρ, τ_ρ = the (1 − ρ) quantile of the valid entropies."""
    s2t = s2t_decision(logprobs, entropy, advantages, response_mask, params.s2t, group)
    return FilterResult(high_entropy_mask(entropy, response_mask, params.top_entropy_quantile, group=group), s2t)


# ---- the public masks ------------------------------------------------------------------------


def s2t_mask(logprobs, entropy, advantages, response_mask, tau_p=None, tau_h=None, tau_h_quantile=None,
             tau_h_population=None, tau_h_max=None, group=None) -> torch.Tensor:
    """STAPO's spurious-token mask (True = silenced): valid ∧ A > 0 ∧ p < τ_p ∧ H < τ_h.

    Thresholds left None take `S2TSettings`' defaults; `tau_h` None means the `tau_h_quantile` of the
    entropies of `tau_h_population` (valid | low_prob | candidates), capped at `tau_h_max`. Returns a bool [B, T].
    """
    settings = S2TSettings.resolve(tau_p=tau_p, tau_h=tau_h, tau_h_quantile=tau_h_quantile,
                                   tau_h_population=tau_h_population, tau_h_max=tau_h_max)
    return s2t_decision(logprobs, entropy, advantages, response_mask, settings, group).spurious


def high_entropy_mask(entropy, response_mask, top_quantile: float = 0.2, threshold=None, group=None) -> torch.Tensor:
    """20-Entropy's mask (True = keep): valid tokens with H ≥ the (1 − top_quantile) quantile of the valid
    tokens' entropies. `threshold` overrides the quantile."""
    ent = check_float("entropy", entropy)
    valid = check_mask("response_mask", response_mask, ent.shape)
    check_prob("top_quantile", top_quantile)
    with torch.no_grad():
        e = ent.detach().float()
        check_finite("entropy", e, valid)
        if threshold is None:
            threshold = high_entropy_threshold(e, valid, top_quantile, group)
        return valid & (e >= threshold)
