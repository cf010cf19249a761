"""Token filters: which valid tokens of a batch get gradient. A registry of pure functions with one
signature, like verl's `core_algos` policy losses:

    filter(logprobs, entropy, advantages, response_mask, params, group=None, step_tau_h=None) -> FilterResult

    name          loss mask                                                applies S2T  denominator
    none          valid                                                    no           kept (= valid)
    s2t           valid ∧ ¬M,  M = A > 0 ∧ p < τ_p ∧ H < τ_h               yes          kept
    high_entropy  valid ∧ H ≥ τ_ρ, τ_ρ = (1 − ρ)-quantile                  no           valid

(none: GRPO, DAPO, Dr.GRPO, JustRL; s2t: STAPO; high_entropy: 20-Entropy.) Each registry entry is a
`TokenFilterSpec` carrying these properties, which engines read instead of comparing names:
`denominator` "kept" averages the loss over the tokens that get gradient (silenced tokens leave the
denominator), "valid" over all valid tokens.

`logprobs`, `entropy`: the current policy's per-token values [B, T]; `advantages` [B] or [B, T];
`response_mask` [B, T] (bool or 0/1); `params` a `FilterParams`. Every filter also returns the S2T
decision on the batch (what STAPO would silence), so runs of every method log the same diagnostics.
Entropy quantiles are taken over the tokens passed in, gathered across the ranks of `group` when
torch.distributed is initialised; `step_tau_h` (from `s2t_threshold` over a whole optimizer step)
replaces S2T's quantile, which is how an engine takes it per mini-batch. Nothing here carries gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
from stapo.core.loss_settings import check_top_entropy_quantile
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


def _world_size(group: dist.ProcessGroup | None = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def gather_valid(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate a 1-D tensor of variable length from every rank (identity when not distributed)."""
    world = _world_size(group)
    if world == 1:
        return values
    n = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), device=values.device, dtype=values.dtype)
    padded[: values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, counts)])


def entropy_quantile(entropy: torch.Tensor, population: torch.Tensor, quantile: float,
                     group: dist.ProcessGroup | None = None) -> torch.Tensor:
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


def _s2t_masks(lp: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor,
               settings: S2TSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(low_prob, candidate, the population tau_h's quantile is taken over)."""
    log_tau_p = math.log(settings.tau_p) if settings.tau_p > 0 else -math.inf
    low_prob = valid & (lp < log_tau_p)
    candidate = low_prob & (adv > 0)
    population = {"valid": valid, "low_prob": low_prob, "candidates": candidate}[settings.tau_h_population]
    return low_prob, candidate, population


def _checked(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor,
             response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = check_float("logprobs", logprobs, ndim=2)
    ent = check_float("entropy", entropy, ndim=2)
    check_same_shape("entropy", ent, "logprobs", lp)
    valid = check_mask("response_mask", response_mask, lp.shape)
    adv = broadcast_advantages(advantages, lp.shape)
    lp = lp.detach() if lp.dtype == torch.float64 else lp.detach().float()
    e = ent.detach().float()
    check_finite("logprobs", lp, valid)
    check_finite("entropy", e, valid)
    check_finite("advantages", adv, valid)
    return lp, e, adv, valid


def s2t_population(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                   settings: S2TSettings) -> torch.Tensor:
    """The entropies (1-D float32, this rank) of the tokens S2T's tau_h quantile is taken over:
    valid | low_prob (valid ∧ p < τ_p) | candidates (low_prob ∧ A > 0), per `settings.tau_h_population`."""
    with torch.no_grad():
        lp, e, adv, valid = _checked(logprobs, entropy, advantages, response_mask)
        return e[_s2t_masks(lp, adv, valid, settings)[2]]


def s2t_threshold(populations: torch.Tensor | Sequence[torch.Tensor], settings: S2TSettings,
                  group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """S2T's τ_h (float32 0-d, nats) over the `s2t_population`s of one batch's parts, on every rank of `group`:

        τ_h = settings.tau_h, or min(tau_h_max, the tau_h_quantile of the concatenated populations)

    -inf when the population is empty everywhere (nothing is silenced). Passing the populations of all
    micro-batches of an optimizer step gives the mini-batch scope: the decision is then the same however
    the step is split into micro-batches or ranks.
    """
    parts = [populations] if isinstance(populations, torch.Tensor) else list(populations)
    device = parts[0].device if parts else torch.device("cpu")
    if settings.tau_h is not None:
        return torch.tensor(settings.tau_h, dtype=torch.float32, device=device)
    with torch.no_grad():
        local = torch.cat([p.detach().float().reshape(-1) for p in parts]) if parts else torch.zeros(0, device=device)
        threshold = quantile_linear(gather_valid(local, group), settings.tau_h_quantile)
        if torch.isnan(threshold):  # an empty population: nothing is silenced
            threshold = torch.tensor(float("-inf"), device=device)
        return torch.clamp(threshold, max=settings.tau_h_max)


def s2t_decision(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                 settings: S2TSettings, group: dist.ProcessGroup | None = None,
                 step_tau_h: torch.Tensor | float | None = None, **renamed: Any) -> S2TDecision:
    """The S2T mask and its counts (checked inputs; see the module docstring for shapes).

        low_prob   = valid ∧ p < τ_p           (as logprob < log τ_p: no exp)
        candidate  = low_prob ∧ A > 0
        τ_h        = `step_tau_h` when given (e.g. `s2t_threshold` over the whole optimizer step), else
                     `s2t_threshold` of this batch's `s2t_population`
        M          = candidate ∧ H < τ_h
    """
    threshold = _renamed_tau_h(renamed, step_tau_h)
    with torch.no_grad():
        lp, e, adv, valid = _checked(logprobs, entropy, advantages, response_mask)
        low_prob, candidate, population = _s2t_masks(lp, adv, valid, settings)
        if threshold is None:
            threshold = s2t_threshold(e[population], settings, group)
        threshold = torch.as_tensor(threshold, dtype=torch.float32, device=e.device).reshape(())
        low_entropy = valid & (e < threshold)
        spurious = candidate & low_entropy
        n: Callable[[torch.Tensor], torch.Tensor] = lambda m: m.sum(dtype=torch.float32)  # noqa: E731
        return S2TDecision(spurious, threshold, n(valid), n(low_prob), n(low_entropy), n(candidate), n(spurious),
                           candidate)


class StepS2T(NamedTuple):
    """S2T over a whole optimizer step, taken before its micro-batches' losses."""

    step_tau_h: torch.Tensor | None  # τ_h for every micro-batch (mini_batch scope), None: each takes its own
    num_silenced: torch.Tensor       # tokens silenced in the whole step, summed over the ranks of `group`


def s2t_over_step(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], settings: S2TSettings,
                  group: dist.ProcessGroup | None = None) -> StepS2T:
    """S2T's τ_h and silenced-token count over an optimizer step's micro-batches, each `part` a
    (logprobs, entropy, advantages, response_mask) of one micro-batch on this rank (all ranks call it with
    the same number of parts). `mini_batch` scope: one τ_h over every part and rank (`s2t_threshold`);
    `micro_batch`: each part's own, gathered over the ranks, as its loss will take it. The count is what
    the "kept" token-mean denominator of the step leaves out."""
    if settings.tau_h_scope == "mini_batch" or settings.tau_h is not None:
        tau_h = s2t_threshold([s2t_population(*part, settings) for part in parts], settings, group)
        decisions = [s2t_decision(*part, settings, group, step_tau_h=tau_h) for part in parts]
    else:
        tau_h, decisions = None, [s2t_decision(*part, settings, group) for part in parts]
    device = parts[0][0].device if parts else torch.device("cpu")
    local = torch.stack([d.n_spurious for d in decisions]).sum() if decisions else torch.zeros((), device=device)
    if _world_size(group) > 1:
        dist.all_reduce(local, group=group)
    return StepS2T(tau_h, local)


def tau_h_for_fraction(entropy: torch.Tensor, candidates: torch.Tensor, n_valid: float | torch.Tensor,
                       target: float) -> float | None:
    """The smallest absolute τ_h (nats) under which at least `target` · n_valid of the `candidates`
    (valid ∧ p < τ_p ∧ A > 0) have H < τ_h: just above the k-th smallest candidate entropy,
    k = ⌈target · n_valid⌉ (the mask's "<" is strict). None when fewer than k candidates exist."""
    ent = entropy.detach().float()[check_mask("candidates", candidates, entropy.shape)]
    k = max(1, math.ceil(target * float(n_valid) - 1e-9))
    if ent.numel() < k:
        return None
    kth = torch.kthvalue(ent, k).values
    return float(torch.nextafter(kth, torch.tensor(float("inf"))))


def high_entropy_threshold(entropy: torch.Tensor, valid: torch.Tensor, top_quantile: float,
                           group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """20-Entropy's τ_ρ: the (1 − ρ) quantile of the valid tokens' entropies (+inf when none is valid)."""
    check_top_entropy_quantile(top_quantile, "top_quantile")
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
    s2t: S2TDecision         # measured for every filter; applied only where the filter's applies_s2t


TokenFilter = Callable[..., FilterResult]
DENOMINATORS = ("kept", "valid")


@dataclass(frozen=True)
class TokenFilterSpec:
    """A registered token filter and the properties engines read (never its name)."""

    name: str
    fn: TokenFilter
    applies_s2t: bool                # the loss mask leaves out S2T's spurious tokens
    denominator: str                 # "kept": token-mean over the tokens that get gradient; "valid": over all valid
    uses_top_entropy_quantile: bool = False  # reads params.top_entropy_quantile (20-Entropy's rho)

    def __post_init__(self) -> None:
        if self.denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {DENOMINATORS}, got {self.denominator!r}")

    def __call__(self, logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor, params: FilterParams | None = None,
                 group: dist.ProcessGroup | None = None, step_tau_h: torch.Tensor | float | None = None,
                 **renamed: Any) -> FilterResult:
        step_tau_h = _renamed_tau_h(renamed, step_tau_h)
        return self.fn(logprobs, entropy, advantages, response_mask, params or FilterParams(), group, step_tau_h)


TOKEN_FILTERS: dict[str, TokenFilterSpec] = {}


def register_token_filter(name: str, *, applies_s2t: bool, denominator: str,
                          uses_top_entropy_quantile: bool = False) -> Callable[[TokenFilter], TokenFilter]:
    def decorator(fn: TokenFilter) -> TokenFilter:
        TOKEN_FILTERS[name] = TokenFilterSpec(name, fn, applies_s2t, denominator, uses_top_entropy_quantile)
        return fn

    return decorator


def get_token_filter(name: str) -> TokenFilterSpec:
    try:
        return TOKEN_FILTERS[name]
    except KeyError:
        raise ValueError(f"unknown token filter {name!r}; known: {', '.join(TOKEN_FILTERS)}") from None


def apply_token_filter(name: str, logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor,
                       response_mask: torch.Tensor, params: FilterParams | None = None,
                       group: dist.ProcessGroup | None = None, step_tau_h: torch.Tensor | float | None = None,
                       **renamed: Any) -> FilterResult:
    """`TOKEN_FILTERS[name](...)`: the one place engines and analyze decide which tokens learn."""
    return get_token_filter(name)(logprobs, entropy, advantages, response_mask, params, group,
                                  _renamed_tau_h(renamed, step_tau_h))


@register_token_filter("none", applies_s2t=False, denominator="kept")
def keep_valid(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
               params: FilterParams, group: dist.ProcessGroup | None = None,
               step_tau_h: torch.Tensor | float | None = None) -> FilterResult:
    """loss mask = valid."""
    s2t = s2t_decision(logprobs, entropy, advantages, response_mask, params.s2t, group, step_tau_h)
    return FilterResult(check_mask("response_mask", response_mask, logprobs.shape), s2t)


@register_token_filter("s2t", applies_s2t=True, denominator="kept")
def silence_spurious(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, params: FilterParams, group: dist.ProcessGroup | None = None,
                     step_tau_h: torch.Tensor | float | None = None) -> FilterResult:
    """STAPO: loss mask = valid ∧ ¬M with M = A > 0 ∧ p < τ_p ∧ H < τ_h (`s2t_decision`)."""
    s2t = s2t_decision(logprobs, entropy, advantages, response_mask, params.s2t, group, step_tau_h)
    valid = check_mask("response_mask", response_mask, logprobs.shape)
    return FilterResult(valid & ~s2t.spurious, s2t)


@register_token_filter("high_entropy", applies_s2t=False, denominator="valid", uses_top_entropy_quantile=True)
def keep_high_entropy(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, params: FilterParams, group: dist.ProcessGroup | None = None,
                      step_tau_h: torch.Tensor | float | None = None) -> FilterResult:
    """20-Entropy: loss mask = valid ∧ H ≥ τ_ρ, τ_ρ = the (1 − ρ) quantile of the valid entropies."""
    s2t = s2t_decision(logprobs, entropy, advantages, response_mask, params.s2t, group, step_tau_h)
    return FilterResult(high_entropy_mask(entropy, response_mask, params.top_entropy_quantile, group=group), s2t)


# ---- the public masks ------------------------------------------------------------------------


def s2t_mask(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
             settings: S2TSettings | None = None, group: dist.ProcessGroup | None = None,
             step_tau_h: torch.Tensor | float | None = None, **renamed: Any) -> torch.Tensor:
    """STAPO's spurious-token mask (True = silenced): valid ∧ A > 0 ∧ p < τ_p ∧ H < τ_h, bool [B, T].

    `settings` None: `S2TSettings()` (the paper's rule); `step_tau_h` replaces the batch's own τ_h.
    """
    return s2t_decision(logprobs, entropy, advantages, response_mask, settings or S2TSettings(), group,
                        _renamed_tau_h(renamed, step_tau_h)).spurious


def _renamed_tau_h(renamed: dict[str, Any], step_tau_h: torch.Tensor | float | None) -> torch.Tensor | float | None:
    """`threshold=` / `s2t_threshold=`, the names of `step_tau_h` before 0.2: accepted with a DeprecationWarning."""
    for old in ("threshold", "s2t_threshold"):
        if old in renamed:
            warnings.warn(f"{old}= is deprecated; use step_tau_h=", DeprecationWarning, stacklevel=3)
            value = renamed.pop(old)
            step_tau_h = value if step_tau_h is None else step_tau_h
    if renamed:
        raise TypeError(f"unexpected keyword arguments {sorted(renamed)}")
    return step_tau_h


def high_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, top_quantile: float = 0.2,
                      threshold: torch.Tensor | float | None = None,
                      group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """20-Entropy's mask (True = keep): valid tokens with H ≥ the (1 − top_quantile) quantile of the valid
    tokens' entropies. `threshold` overrides the quantile."""
    ent = check_float("entropy", entropy)
    valid = check_mask("response_mask", response_mask, ent.shape)
    check_top_entropy_quantile(top_quantile, "top_quantile")
    with torch.no_grad():
        e = ent.detach().float()
        check_finite("entropy", e, valid)
        if threshold is None:
            threshold = high_entropy_threshold(e, valid, top_quantile, group)
        return valid & (e >= threshold)
