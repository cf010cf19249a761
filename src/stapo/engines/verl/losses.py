"""STAPO and 20-Entropy as verl policy losses (`policy_loss.loss_mode=stapo` / `20-entropy`).

Each is `stapo.core.filtered_policy_loss` with the loss mode's token filter in front of verl's clipped
loss. The plugin's four jobs, one module each:

    losses.py           the registered losses (this module)
    entropy_channel.py  the entropy side channel: each micro-batch's entropies (and what the engine hook
                        knows of its mini-batch) for losses whose signature has none
    aggregation.py      verl's loss aggregation in stapo.core's terms (denominators per rank)
    engine_hook.py      the import hook: verl's engine call and driver pass wrapped when verl imports them
                        (S2T's mini-batch pre-pass, pi_old's entropies kept), and each verl module's
                        private symbols checked (`internals.py`)

The names this module exported before the split (`core_loss_kwargs`, `entropy_context`, `install_engine_hook`,
`mini_batch_s2t`, `with_entropy`, `OLD_ENTROPY_KEY`) are still importable from it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from verl.trainer.ppo.core_algos import register_policy_loss

from stapo.core import (
    FilterParams,
    S2TSettings,
    TokenFilterSpec,
    filtered_policy_loss,
    nonfinite_positions,
    s2t_decision,
    tau_h_for_fraction,
)
from stapo.core.monitor import PAPER_MASKED_FRACTION, InertS2TMonitor
from stapo.engines.verl.aggregation import core_loss_kwargs, silenced_share
from stapo.engines.verl.config import loss_mode_filter, stapo_settings
from stapo.engines.verl.engine_hook import install_engine_hook, mini_batch_s2t
from stapo.engines.verl.entropy_channel import (
    OLD_ENTROPY_KEY,
    MiniBatchS2T,
    current_inputs,
    entropy_context,
    with_entropy,
)

logger = logging.getLogger(__name__)
__all__ = [
    "compute_policy_loss_high_entropy",
    "compute_policy_loss_stapo",
    "core_loss_kwargs",
    "entropy_context",
    "install_engine_hook",
    "mini_batch_s2t",
    "OLD_ENTROPY_KEY",
    "with_entropy",
]


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
_S2T_METRICS = {
    "s2t_candidates": "s2t_candidates",
    "s2t_masked_count": "s2t_masked_count",
    "s2t_masked_frac": "s2t_masked_frac",
    "frac_low_prob": "s2t_frac_low_prob",
    "frac_low_entropy": "s2t_frac_low_entropy",
    "entropy_threshold": "s2t_entropy_threshold",
}
_HIGH_ENTROPY_METRICS = {"entropy_kept_count": "entropy_kept_count", "entropy_kept_frac": "entropy_kept_frac"}


def _step_threshold(spec: TokenFilterSpec, s2t: S2TSettings, mini_batch: MiniBatchS2T | None):
    """S2T's tau_h for this micro-batch: the mini-batch's (pre-pass), or None (its own quantile).

    Refuses a mini-batch scope it cannot honour: several micro-batches and no pre-pass threshold."""
    if mini_batch is None:
        return None
    mini_batch.loss_calls += 1
    if mini_batch.threshold is not None or mini_batch.nonfinite:
        return mini_batch.threshold
    several = (mini_batch.micro_batches or 1) > 1 or mini_batch.loss_calls > 1
    if spec.applies_s2t and s2t.tau_h_scope == "mini_batch" and s2t.tau_h is None and several:
        raise RuntimeError(
            "stapo.tau_h_scope=mini_batch: this PPO mini-batch has several micro-batches but no pre-pass "
            "threshold (the engine hook did not find the actor config on the loss function, or the engine "
            "split the mini-batch differently from verl's FSDP engine); set "
            "actor_rollout_ref.actor.policy_loss.stapo.tau_h_scope=micro_batch"
        )
    return None


def _token_filter_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                       rollout_is_weights):
    """The registered losses: `stapo.core.filtered_policy_loss` with the loss mode's token filter, verl's
    aggregation translated (`core_loss_kwargs`) and what the engine hook knows of the mini-batch."""
    _check_no_weights(rollout_is_weights, loss_mode)
    inputs = current_inputs(loss_mode)
    spec = loss_mode_filter(loss_mode)
    assert spec is not None, loss_mode  # registered for the plugin's loss modes only
    settings = stapo_settings(config)
    s2t = settings.s2t
    valid = response_mask.bool()
    old_policy = spec.applies_s2t and s2t.decision_policy == "old"
    if old_policy and inputs.old_entropy is None:
        raise ValueError(f"stapo.decision_policy=old needs pi_old's entropies in the actor batch "
                         f"({OLD_ENTROPY_KEY}); launch with `python -m stapo.engines.verl.main`, which keeps them")
    decision = (old_log_prob, inputs.old_entropy) if old_policy else (None, None)
    bad = nonfinite_positions(valid, log_prob, inputs.entropy, old_log_prob, *decision)
    if bad:  # no exception: the gradient is made non-finite, so verl's optimizer step skips the update
        return _nonfinite_loss(log_prob, bad)
    kwargs = core_loss_kwargs(config, loss_agg_mode)
    num_valid = kwargs.pop("num_tokens", None)
    out = filtered_policy_loss(
        log_prob, old_log_prob, advantages, valid, inputs.entropy, spec,
        FilterParams(s2t=s2t, top_entropy_quantile=settings.top_entropy_quantile),
        decision_logprobs=decision[0], decision_entropy=decision[1],
        step_tau_h=_step_threshold(spec, s2t, inputs.mini_batch) if spec.applies_s2t else None,
        num_valid=num_valid, num_silenced=silenced_share(loss_agg_mode, config, inputs.mini_batch),
        group=inputs.dp_group, **kwargs,
    )
    names = dict(_COMMON_METRICS, **_S2T_METRICS)  # S2T is measured for every filter (applied where it applies)
    if spec.applies_s2t:
        _watch_inert(s2t, out.s2t, *decision_values(log_prob, inputs.entropy, decision), advantages, valid)
    if spec.uses_top_entropy_quantile:
        names.update(_HIGH_ENTROPY_METRICS)
    return out.loss, _verl_metrics(out.metrics, names)


def decision_values(log_prob: torch.Tensor, entropy: torch.Tensor,
                    decision: tuple[torch.Tensor | None, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (log-probs, entropies) S2T decided on: pi_old's where given, else the current ones."""
    old_log_prob, old_entropy = decision
    if old_log_prob is None:
        return log_prob, entropy
    assert old_entropy is not None  # pi_old's values come as a pair
    return old_log_prob, old_entropy


def _nonfinite_loss(log_prob: torch.Tensor, positions: int):
    """A micro-batch whose forward (or pi_old's values) holds NaN/inf at `positions` valid positions: a NaN
    loss whose gradient is NaN, so verl's optimizer step finds a non-finite gradient norm and skips the
    update (its own guard), and the count in the metrics."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        logger.warning("stapo: non-finite forward at %d valid position(s); verl skips this optimizer step", positions)
    loss = (log_prob * 0.0).sum() * float("nan")
    return loss, {"actor/nonfinite_positions": float(positions)}


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
    (`stapo.tau_h`) or `min(tau_h_max, the tau_h_quantile quantile of the entropies of tau_h_population)`
    over the PPO mini-batch (`tau_h_scope=mini_batch`: every micro-batch and data-parallel rank) or over
    this micro-batch gathered across the ranks (`micro_batch`); an empty population silences nothing.
    The token-mean denominator leaves the silenced tokens out (see the module docstring).
    """
    return _token_filter_loss("stapo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                              rollout_is_weights)


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

    ρ = `stapo.top_entropy_quantile`; τ_ρ per micro-batch, gathered across the data-parallel ranks.
    """
    return _token_filter_loss("20-entropy", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                              config, rollout_is_weights)


_INERT: dict[S2TSettings, InertS2TMonitor] = {}


def _watch_inert(s2t: S2TSettings, decision, log_prob, entropy, advantages, valid) -> None:
    """The silently-inert guard: verl calls the loss once per micro-batch, so K counts micro-batches
    (this rank's; the warning is logged on rank 0)."""
    monitor = _INERT.setdefault(s2t, InertS2TMonitor(s2t))

    def suggest():  # the candidates do not depend on tau_h: no collective needed
        d = s2t_decision(log_prob, entropy, advantages, valid, replace(s2t, tau_h=0.0))
        return tau_h_for_fraction(entropy, d.candidates, d.n_valid, PAPER_MASKED_FRACTION)

    threshold = float(torch.nan_to_num(decision.threshold.float(), neginf=0.0))
    message = monitor.update(float(decision.n_spurious), float(decision.n_valid), float(decision.n_low_prob),
                             float(decision.n_candidates), threshold, suggest)
    if message and (not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0):
        logger.warning("stapo: %s (verl: counted in micro-batches)", message)
