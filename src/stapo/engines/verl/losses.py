"""STAPO and 20-Entropy as verl policy losses, and the actor-loss hook that hands them entropies.

verl's policy-loss signature is
    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
and carries no entropy. The actor's loss function (`verl.workers.utils.losses.ppo_loss`) is the one
place where the current policy's log-probs, entropies and advantages of a micro-batch are together.
`stapo_actor_loss` wraps it: for `loss_mode` `stapo` / `20-entropy` it puts the micro-batch's
entropies (and the data-parallel group) in a context variable, then runs verl's own `ppo_loss`,
which calls the registered loss below; for every other loss mode it is verl's `ppo_loss`, unchanged.

Aggregation. verl's `agg_loss` returns, per micro-batch on one of `dp` ranks,

    token-mean:        Σ m ℓ / batch_num_tokens · dp
    token-sum:         Σ m ℓ · dp
    seq-mean-*:        Σ_i s_i / global_batch_size · dp       (÷ loss_scale_factor for -norm)

because FSDP/DDP *average* gradients over ranks. `stapo.core.aggregate` uses global denominators
and no dp factor, so the same number is core's loss with

    num_tokens = batch_num_tokens / dp     (token-mean)
    num_tokens = 1 / dp                    (token-sum: token-mean with a unit denominator)
    num_seqs   = global_batch_size / dp    (seq modes),   horizon = loss_scale_factor.

Without global batch info (dp = 1) both use the micro-batch's own counts, so STAPO renormalises
over the valid tokens it does not silence, exactly as `stapo.core.stapo_loss`. With verl's global
batch info the denominators are verl's (all valid tokens of the mini-batch on every rank): the S2T
mask is decided per micro-batch on the current policy, after the counts were taken, so the silenced
tokens stay in the denominator — a relative change of the step's gradient scale equal to the masked
fraction (logged as `actor/s2t_masked_frac`, ~1e-4 in the paper).
"""

from __future__ import annotations

import contextvars
import logging
import sys
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from verl.trainer.ppo.core_algos import register_policy_loss

from stapo.core import S2TSettings, high_entropy_loss, s2t_decision, stapo_loss, tau_h_for_fraction
from stapo.core.monitor import PAPER_MASKED_FRACTION, InertS2TMonitor
from stapo.engines.verl.config import LOSS_MODES, stapo_settings

logger = logging.getLogger(__name__)
__all__ = [
    "compute_policy_loss_high_entropy",
    "compute_policy_loss_stapo",
    "core_loss_kwargs",
    "entropy_context",
    "install_actor_loss_hook",
    "stapo_actor_loss",
]


@dataclass(frozen=True)
class _TokenEntropy:
    entropy: torch.Tensor  # [B, T], aligned with log_prob / response_mask, detached
    dp_group: Any = None


_ENTROPY: contextvars.ContextVar[Optional[_TokenEntropy]] = contextvars.ContextVar("stapo_entropy", default=None)


class entropy_context:
    """`with entropy_context(entropy, dp_group): ...` — the entropies the registered losses read."""

    def __init__(self, entropy: torch.Tensor, dp_group=None):
        self._value = _TokenEntropy(entropy.detach(), dp_group)
        self._token = None

    def __enter__(self):
        self._token = _ENTROPY.set(self._value)
        return self._value

    def __exit__(self, *exc):
        _ENTROPY.reset(self._token)
        return False


def _current_entropy(loss_mode: str) -> _TokenEntropy:
    value = _ENTROPY.get()
    if value is None:
        raise ValueError(
            f"policy_loss.loss_mode={loss_mode} needs per-token entropies: set "
            "actor_rollout_ref.actor.calculate_entropy=True and import stapo.engines.verl in the workers "
            "(launch with `python -m stapo.engines.verl.main`, which does both)"
        )
    return value


def core_loss_kwargs(config, loss_agg_mode: str) -> dict:
    """`stapo.core.policy_loss` keyword arguments equal to verl's vanilla loss under `config`.

    Reads the clip range (`clip_ratio_low/high`, falling back to `clip_ratio`), `clip_ratio_c`
    (dual clip, verl's default 3.0) and `config.global_batch_info` (dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor) as verl's `agg_loss` does; see the module docstring.
    """
    if config is None:
        raise ValueError("the actor config is required (verl passes it as `config`)")
    clip = config.get("clip_ratio", 0.2)
    clip_low = config.get("clip_ratio_low", None)
    clip_high = config.get("clip_ratio_high", None)
    clip_low = clip if clip_low is None else clip_low
    clip_high = clip if clip_high is None else clip_high
    clip_ratio_c = config.get("clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"actor.clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")
    info = dict(config.get("global_batch_info", None) or {})
    dp = int(info.get("dp_size", 1) or 1)
    batch_num_tokens = info.get("batch_num_tokens", None)
    global_batch_size = info.get("global_batch_size", None)
    scale = info.get("loss_scale_factor", None)
    if scale is None:
        scale = config.get("loss_scale_factor", None)
    kwargs: dict[str, Any] = dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        kwargs.update(agg="token-mean", num_tokens=None if batch_num_tokens is None else float(batch_num_tokens) / dp)
    elif loss_agg_mode == "token-sum":
        kwargs.update(agg="token-mean", num_tokens=1.0 / dp)
    elif loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        if global_batch_size is None and dp > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        kwargs.update(agg=loss_agg_mode, num_seqs=None if global_batch_size is None else float(global_batch_size) / dp)
        if loss_agg_mode == "seq-mean-token-sum-norm" and scale is not None:
            kwargs["horizon"] = float(scale)
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return kwargs


def _check_no_weights(rollout_is_weights, loss_mode: str) -> None:
    if rollout_is_weights is not None:
        raise ValueError(
            f"policy_loss.loss_mode={loss_mode} does not support rollout-correction importance weights "
            "(algorithm.rollout_correction); disable them for this loss"
        )


def _verl_metrics(metrics: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, float]:
    return {f"actor/{out}": float(metrics[key].detach().float().item()) for key, out in names.items() if key in metrics}


_COMMON_METRICS = {
    "clip_frac": "pg_clipfrac",
    "clip_frac_low": "pg_clipfrac_low",
    "clip_frac_high": "pg_clipfrac_high",
    "approx_kl": "ppo_kl",
    "ratio_mean": "ratio_mean",
}


@register_policy_loss("stapo")
def compute_policy_loss_stapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """STAPO (verl's vanilla clipped loss over the tokens the S2T mask does not silence):

        M_t = valid_t ∧ A_t > 0 ∧ π_θ(o_t) < tau_p ∧ H_t < tau_h
        loss = agg( max(-A r, -A clip(r, 1-ε_low, 1+ε_high)) [dual clip where A < 0], valid ∧ ¬M )

    with π_θ, H the current policy's (detached) values of this micro-batch and tau_h absolute
    (`stapo.tau_h`) or the `stapo.tau_h_quantile` quantile of the entropies of `stapo.tau_h_population`
    gathered over the data-parallel group (an empty population silences nothing). Computed by
    `stapo.core.stapo_loss`, which applies the "s2t" token filter.
    """
    _check_no_weights(rollout_is_weights, "stapo")
    ctx = _current_entropy("stapo")
    s2t = stapo_settings(config).s2t
    loss, metrics = stapo_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask.bool(),
        ctx.entropy,
        s2t,
        group=ctx.dp_group,
        **core_loss_kwargs(config, loss_agg_mode),
    )
    _watch_inert(s2t, metrics, log_prob, ctx.entropy, advantages, response_mask)
    names = dict(
        _COMMON_METRICS,
        s2t_candidates="s2t_candidates",
        s2t_masked_count="s2t_masked_count",
        s2t_masked_frac="s2t_masked_frac",
        frac_low_prob="s2t_frac_low_prob",
        frac_low_entropy="s2t_frac_low_entropy",
        entropy_threshold="s2t_entropy_threshold",
    )
    return loss, _verl_metrics(metrics, names)


_INERT: dict[S2TSettings, InertS2TMonitor] = {}


def _watch_inert(s2t: S2TSettings, metrics, log_prob, entropy, advantages, response_mask) -> None:
    """The silently-inert guard: verl calls the loss once per micro-batch, so K counts micro-batches
    (this rank's; the warning is logged on rank 0)."""
    monitor = _INERT.setdefault(s2t, InertS2TMonitor(s2t))
    n_valid = float(metrics["num_tokens"] + metrics["s2t_masked_count"])

    def suggest():  # the candidates do not depend on tau_h: no collective needed
        d = s2t_decision(log_prob, entropy, advantages, response_mask.bool(), replace(s2t, tau_h=0.0))
        return tau_h_for_fraction(entropy, d.candidates, d.n_valid, PAPER_MASKED_FRACTION)

    message = monitor.update(float(metrics["s2t_masked_count"]), n_valid, float(metrics["frac_low_prob"]) * n_valid,
                             float(metrics["s2t_candidates"]), float(metrics["entropy_threshold"]), suggest)
    if message and (not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0):
        logger.warning("stapo: %s (verl: counted in micro-batches)", message)


@register_policy_loss("20-entropy")
def compute_policy_loss_high_entropy(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """20-Entropy: verl's vanilla clipped loss on the top-ρ entropy tokens only,

        keep_t = valid_t ∧ H_t ≥ τ_ρ,   τ_ρ = (1 - ρ) quantile of the valid tokens' entropies
        loss   = Σ keep ℓ / (all valid tokens)                  (token-mean; other modes likewise)

    ρ = `stapo.top_entropy_quantile`; τ_ρ over the data-parallel group. Computed by
    `stapo.core.high_entropy_loss`.
    """
    _check_no_weights(rollout_is_weights, "20-entropy")
    ctx = _current_entropy("20-entropy")
    kwargs = core_loss_kwargs(config, loss_agg_mode)
    num_tokens = kwargs.pop("num_tokens", None)
    loss, metrics = high_entropy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask.bool(),
        ctx.entropy,
        top_entropy_quantile=stapo_settings(config).top_entropy_quantile,
        num_tokens=num_tokens,
        group=ctx.dp_group,
        **kwargs,
    )
    names = dict(_COMMON_METRICS, entropy_kept_count="entropy_kept_count", entropy_kept_frac="entropy_kept_frac")
    return loss, _verl_metrics(metrics, names)


# ---------------------------------------------------------------------------------------------
# The actor-loss hook.

_VERL_PPO_LOSS = None


def stapo_actor_loss(config, model_output, data, dp_group=None):
    """verl's actor loss (`ppo_loss`), with the micro-batch's entropies made available to the
    `stapo` / `20-entropy` policy losses. Other loss modes go straight to verl's `ppo_loss`."""
    if _VERL_PPO_LOSS is None:
        raise RuntimeError("stapo.engines.verl.install_actor_loss_hook() has not run")
    loss_mode = config.policy_loss.get("loss_mode", "vanilla")
    if loss_mode not in LOSS_MODES:
        return _VERL_PPO_LOSS(config, model_output, data, dp_group=dp_group)
    entropy = model_output.get("entropy", None)
    if entropy is None:
        raise ValueError(
            f"policy_loss.loss_mode={loss_mode} needs per-token entropies but the actor did not compute "
            "them: set actor_rollout_ref.actor.calculate_entropy=True (python -m stapo.engines.verl.main does)"
        )
    from verl.workers.utils.padding import no_padding_2_padding

    with entropy_context(no_padding_2_padding(entropy, data), dp_group):
        return _VERL_PPO_LOSS(config, model_output, data, dp_group=dp_group)


stapo_actor_loss._stapo_hook = True  # type: ignore[attr-defined]


def install_actor_loss_hook() -> None:
    """Route verl's actor loss through `stapo_actor_loss` (idempotent).

    The engine worker binds `ppo_loss` from `verl.workers.utils.losses` when it builds the actor;
    both names are replaced, so it works whether or not the worker module was imported first."""
    global _VERL_PPO_LOSS
    import verl.workers.utils.losses as verl_losses

    current = verl_losses.ppo_loss
    if not getattr(current, "_stapo_hook", False):
        _VERL_PPO_LOSS = current
        verl_losses.ppo_loss = stapo_actor_loss
    workers = sys.modules.get("verl.workers.engine_workers")
    if workers is not None and getattr(workers, "ppo_loss", None) is _VERL_PPO_LOSS:
        workers.ppo_loss = stapo_actor_loss
