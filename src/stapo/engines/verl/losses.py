"""STAPO and 20-Entropy as verl policy losses, and the engine hook that hands them entropies.

verl's policy-loss signature is
    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
and carries no entropy. The actor's loss function (verl's `ppo_loss`, bound by the engine worker) gets
the micro-batch's `model_output`, entropies included when `actor.calculate_entropy=True`, and calls the
registered policy loss without them. The hook (`install_engine_hook`) wraps verl's per-mini-batch call,
`BaseEngine.train_batch(data, loss_function)` (zero grad, the micro-batches' forward/backward, one
optimizer step; every verl engine inherits it):

  - each call of `loss_function` runs with that micro-batch's entropies (and the data-parallel group)
    in a context variable, which the two registered losses read; verl's `ppo_loss` runs unchanged;
  - with `stapo.tau_h_scope=mini_batch` (the default) and a mini-batch that splits into several
    micro-batches, a forward-only pass over the mini-batch first (`mini_batch_s2t`) takes S2T's tau_h
    over all its micro-batches and data-parallel ranks (`stapo.core.s2t_threshold`) and counts the
    tokens it silences; every micro-batch's loss then applies that threshold to its own current
    log-probs and entropies. The decision is the one on the whole mini-batch at once, however it is
    split. One micro-batch per rank needs no pre-pass (its quantile, gathered over the ranks, is the
    mini-batch's). `micro_batch` scope: each micro-batch's own quantile, no pre-pass.

Nothing else changes for other loss modes (their loss functions run as before, with an unused context).

Aggregation. verl's `agg_loss` returns, per micro-batch on one of `dp` ranks,

    token-mean:        Σ m ℓ / batch_num_tokens · dp
    token-sum:         Σ m ℓ · dp
    seq-mean-*:        Σ_i s_i / global_batch_size · dp       (÷ loss_scale_factor for -norm)

because FSDP/DDP *average* gradients over ranks. `stapo.core.aggregate` uses global denominators
and no dp factor, so the same number is core's loss with

    num_tokens = batch_num_tokens / dp     (token-mean)
    num_tokens = 1 / dp                    (token-sum: token-mean with a unit denominator)
    num_seqs   = global_batch_size / dp    (seq modes),   horizon = loss_scale_factor.

STAPO's token-mean denominator leaves the silenced tokens out ("kept", the filter's `denominator`):
`batch_num_tokens` counts every valid token of the mini-batch (verl takes it before the forwards), so
the loss uses batch_num_tokens − (silenced tokens of the mini-batch, all ranks) wherever that count is
known before the micro-batch's loss: from the pre-pass, or when the mini-batch is one micro-batch per
rank (all-reduced in the loss). Only with `micro_batch` scope and several micro-batches per rank is it
unknown; the silenced tokens then stay in the denominator (a relative change of the step's gradient
scale equal to the masked fraction, `actor/s2t_masked_frac`).
"""

from __future__ import annotations

import contextvars
import functools
import importlib.abc
import logging
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from verl.trainer.ppo.core_algos import register_policy_loss

from stapo.core import (
    ALL_RANKS,
    FilterParams,
    S2TSettings,
    TokenFilterSpec,
    filtered_policy_loss,
    nonfinite_positions,
    s2t_decision,
    s2t_over_step,
    tau_h_for_fraction,
)
from stapo.core.monitor import PAPER_MASKED_FRACTION, InertS2TMonitor
from stapo.engines.verl.config import VerlStapoSettings, actor_clip_settings, loss_mode_filter, stapo_settings

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

# pi_old's entropies in the actor-update batch, kept from verl's old-log-prob pass (`keep_old_entropies`)
OLD_ENTROPY_KEY = "old_entropys"


# ---------------------------------------------------------------------------------------------
# What a loss call knows beyond verl's signature.


@dataclass
class MiniBatchS2T:
    """One `train_batch` call (one optimizer step) on this rank, as the losses of its micro-batches see it.

    micro_batches  how many micro-batches this rank's mini-batch splits into (None: not known)
    threshold      S2T's tau_h over the whole mini-batch, every rank (the pre-pass); None: not taken
    masked         tokens S2T silences in the whole mini-batch, summed over the ranks (the pre-pass)
    loss_calls     loss calls so far in this mini-batch
    nonfinite      the pre-pass met non-finite values (no threshold taken)
    """

    micro_batches: Optional[int] = None
    threshold: Optional[torch.Tensor] = None
    masked: Optional[float] = None
    loss_calls: int = 0
    nonfinite: bool = False  # the pre-pass met NaN/inf values: each loss finds its own and the step is skipped


@dataclass(frozen=True)
class _LossInputs:
    entropy: torch.Tensor  # [B, T], aligned with log_prob / response_mask, detached
    dp_group: Any = None
    mini_batch: Optional[MiniBatchS2T] = None
    old_entropy: Optional[torch.Tensor] = None  # [B, T] pi_old's (decision_policy=old), else None


_INPUTS: contextvars.ContextVar[Optional[_LossInputs]] = contextvars.ContextVar("stapo_loss_inputs", default=None)


class entropy_context:
    """`with entropy_context(entropy, dp_group): ...` — the entropies [B, T] the registered losses read
    (what the engine hook provides for each micro-batch; tests call the losses under it directly)."""

    def __init__(self, entropy: torch.Tensor, dp_group=None, mini_batch: MiniBatchS2T | None = None,
                 old_entropy: torch.Tensor | None = None):
        self._value = _LossInputs(entropy.detach(), dp_group, mini_batch,
                                  None if old_entropy is None else old_entropy.detach())
        self._token = None

    def __enter__(self):
        self._token = _INPUTS.set(self._value)
        return self._value

    def __exit__(self, *exc):
        _INPUTS.reset(self._token)
        return False


def _current_inputs(loss_mode: str) -> _LossInputs:
    value = _INPUTS.get()
    if value is None:
        raise ValueError(
            f"policy_loss.loss_mode={loss_mode} needs per-token entropies: set "
            "actor_rollout_ref.actor.calculate_entropy=True and import stapo.engines.verl in the workers "
            "(launch with `python -m stapo.engines.verl.main`, which does both); the loss runs inside verl's "
            "engine `train_batch`"
        )
    return value


# ---------------------------------------------------------------------------------------------
# verl's aggregation in stapo.core's terms.


def core_loss_kwargs(config, loss_agg_mode: str) -> dict:
    """`stapo.core.policy_loss` keyword arguments equal to verl's vanilla loss under `config`.

    Reads the clip range (`clip_ratio_low/high`, falling back to `clip_ratio`), `clip_ratio_c`
    (dual clip, verl's default 3.0) and `config.global_batch_info` (dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor) as verl's `agg_loss` does; see the module docstring.
    """
    if config is None:
        raise ValueError("the actor config is required (verl passes it as `config`)")
    info = _global_info(config)
    dp = info["dp_size"]
    batch_num_tokens = info["batch_num_tokens"]
    global_batch_size = info["global_batch_size"]
    scale = info["loss_scale_factor"]
    kwargs: dict[str, Any] = actor_clip_settings(config)
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


def _global_info(config) -> dict:
    info = dict(config.get("global_batch_info", None) or {})
    scale = info.get("loss_scale_factor", None)
    return {
        "dp_size": int(info.get("dp_size", 1) or 1),
        "batch_num_tokens": info.get("batch_num_tokens", None),
        "global_batch_size": info.get("global_batch_size", None),
        "loss_scale_factor": config.get("loss_scale_factor", None) if scale is None else scale,
    }


def _check_no_weights(rollout_is_weights, loss_mode: str) -> None:
    if rollout_is_weights is not None:
        raise ValueError(
            f"policy_loss.loss_mode={loss_mode} does not support rollout-correction importance weights "
            "(algorithm.rollout_correction); disable them for this loss"
        )


def _all_reduce_sum(value: torch.Tensor, group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


# ---------------------------------------------------------------------------------------------
# The registered losses: a token filter (stapo.core.TOKEN_FILTERS) in front of verl's clipped loss.


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
    inputs = _current_inputs(loss_mode)
    spec = loss_mode_filter(loss_mode)
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
        num_valid=num_valid, num_silenced=_silenced_share(loss_agg_mode, config, inputs.mini_batch),
        group=inputs.dp_group, **kwargs,
    )
    names = dict(_COMMON_METRICS, **_S2T_METRICS)  # S2T is measured for every filter (applied where it applies)
    if spec.applies_s2t:
        _watch_inert(s2t, out.s2t, *decision_values(log_prob, inputs.entropy, decision), advantages, valid)
    if spec.uses_top_entropy_quantile:
        names.update(_HIGH_ENTROPY_METRICS)
    return out.loss, _verl_metrics(out.metrics, names)


def decision_values(log_prob, entropy, decision):
    """The (log-probs, entropies) S2T decided on: pi_old's where given, else the current ones."""
    return (log_prob, entropy) if decision[0] is None else decision


def _silenced_share(loss_agg_mode: str, config, mini_batch: MiniBatchS2T | None):
    """`filtered_policy_loss`'s `num_silenced` in verl's per-rank share (÷ dp): the tokens S2T silences in the
    whole mini-batch where the hook counted them (pre-pass, or pi_old's values), ALL_RANKS where this
    micro-batch is the rank's mini-batch, None where unknown (micro_batch scope over several micro-batches:
    the silenced tokens then stay in the denominator). token-sum has a unit denominator: nothing to subtract."""
    if loss_agg_mode == "token-sum":
        return 0.0
    if mini_batch is not None and mini_batch.masked is not None:
        return mini_batch.masked / _global_info(config)["dp_size"]
    if mini_batch is not None and mini_batch.micro_batches == 1:
        return ALL_RANKS
    return None


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


# ---------------------------------------------------------------------------------------------
# The engine hook.


def _actor_config(loss_function):
    """The actor config bound to a verl loss function (`partial(ppo_loss, config=...)`, as the engine
    worker builds it), or None."""
    seen = 0
    fn = loss_function
    while fn is not None and seen < 4:
        if isinstance(fn, functools.partial):
            config = fn.keywords.get("config", None)
            if config is not None:
                return config
            fn = fn.func
        else:
            fn = getattr(fn, "__wrapped__", None)
        seen += 1
    return None


def _padded(tensor, data) -> torch.Tensor:
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(tensor, data)


def with_entropy(loss_function: Callable, mini_batch: MiniBatchS2T | None = None) -> Callable:
    """`loss_function` (a verl engine loss: `(model_output, data, dp_group)`), called with each
    micro-batch's entropies in the context the registered losses read. Any other call (e.g. verl's
    logits-processor use of the same function) goes straight through."""

    @functools.wraps(loss_function)
    def call(*args, **kwargs):
        model_output, data = kwargs.get("model_output", None), kwargs.get("data", None)
        entropy = model_output.get("entropy", None) if isinstance(model_output, dict) else None
        if entropy is None or data is None:
            return loss_function(*args, **kwargs)
        old_entropy = None
        if OLD_ENTROPY_KEY in data.keys():
            old_entropy = data.select(OLD_ENTROPY_KEY, "response_mask").to_padded_tensor()[OLD_ENTROPY_KEY]
        with entropy_context(_padded(entropy, data), kwargs.get("dp_group", None), mini_batch, old_entropy):
            return loss_function(*args, **kwargs)

    call._stapo_with_entropy = True  # type: ignore[attr-defined]
    return call


def _micro_batch_count(engine, data) -> int:
    """How many micro-batches this rank's mini-batch splits into: verl's own split
    (`prepare_micro_batches`, as the FSDP engine's `forward_backward_batch` calls it)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches

    if not tu.get_non_tensor_data(data=data, key="use_dynamic_bsz", default=True):
        size = data["micro_batch_size_per_gpu"]
        group = tu.get_non_tensor_data(data=data, key="force_group_size", default=1)
        return max(1, len(data) // (size * group))
    sp = getattr(engine, "ulysses_sequence_parallel_size", None)
    if sp is not None:
        tu.assign_non_tensor(data, sp_size=sp)
    micro_batches, _ = prepare_micro_batches(data=data, dp_group=engine.get_data_parallel_group(),
                                             same_micro_num_in_dp=True)
    return len(micro_batches)


def mini_batch_s2t(engine, data, s2t: S2TSettings) -> tuple[torch.Tensor | None, float]:
    """S2T's (tau_h, silenced tokens) over a whole PPO mini-batch, summed over the data-parallel ranks
    (`stapo.core.s2t_over_step`). `decision_policy=current`: a forward-only pass of `engine` over `data`
    (verl's `infer_batch`, the same micro-batches as the training pass) gives the current policy's values;
    `old`: pi_old's log-probs and entropies are in `data` already (no forward)."""
    if s2t.decision_policy == "old":
        if OLD_ENTROPY_KEY not in data.keys():
            raise ValueError(f"stapo.decision_policy=old needs pi_old's entropies in the actor batch "
                             f"({OLD_ENTROPY_KEY}); launch with `python -m stapo.engines.verl.main`, which keeps them")
        fields = data.select("old_log_probs", OLD_ENTROPY_KEY, "advantages", "response_mask").to_padded_tensor()
        parts = [(fields["old_log_probs"], fields[OLD_ENTROPY_KEY], fields["advantages"],
                  fields["response_mask"].bool())]
    else:
        parts = []  # each micro-batch's (log-probs, entropies, advantages, valid), detached

        def collect(model_output=None, data=None, dp_group=None, **_):
            if model_output is None:  # verl's logits-processor call (top-k distillation): nothing to add
                return {}
            if model_output.get("entropy", None) is None:
                raise ValueError("stapo.tau_h_scope=mini_batch: the pre-pass got no entropies; set actor_rollout_ref"
                                 ".actor.calculate_entropy=True (python -m stapo.engines.verl.main does)")
            lp = _padded(model_output["log_probs"], data)
            ent = _padded(model_output["entropy"], data)
            fields = data.select("response_mask", "advantages").to_padded_tensor()
            parts.append((lp.detach(), ent.detach(), fields["advantages"], fields["response_mask"].bool()))
            return torch.zeros((), device=lp.device), {}

        engine.infer_batch(data, loss_function=collect)
    if any(nonfinite_positions(p[3], p[0], p[1]) for p in parts):  # the losses skip the step themselves
        return None, None
    step = s2t_over_step(parts, s2t, group=engine.get_data_parallel_group())
    return step.step_tau_h, float(step.num_silenced.item())


def _field(obj, key):
    getter = getattr(obj, "get", None)
    return getter(key, None) if callable(getter) else getattr(obj, key, None)


def _stapo_settings_for(config) -> tuple[TokenFilterSpec | None, VerlStapoSettings | None]:
    """The token filter and settings of an actor config whose loss mode is the plugin's, else (None, None)."""
    policy_loss = None if config is None else _field(config, "policy_loss")
    spec = None if policy_loss is None else loss_mode_filter(_field(policy_loss, "loss_mode") or "vanilla")
    return (spec, stapo_settings(config)) if spec is not None else (None, None)


_VERL_TRAIN_BATCH = None


def _train_batch(self, data, loss_function):
    """verl's `BaseEngine.train_batch`, with the micro-batches' entropies handed to the stapo losses and,
    for S2T with `tau_h_scope=mini_batch` over several micro-batches, the mini-batch's tau_h taken first."""
    config = _actor_config(loss_function)
    spec, settings = _stapo_settings_for(config)
    if spec is None and config is not None:  # one of verl's own loss modes: untouched
        return _VERL_TRAIN_BATCH(self, data, loss_function=loss_function)
    mini_batch = MiniBatchS2T()
    if spec is not None:
        mini_batch.micro_batches = _micro_batch_count(self, data)
        s2t = settings.s2t
        # pi_old's values are in the batch already: the whole mini-batch's decision costs no forward
        whole = s2t.decision_policy == "old" or mini_batch.micro_batches > 1
        if spec.applies_s2t and s2t.tau_h_scope == "mini_batch" and whole:
            mini_batch.threshold, mini_batch.masked = mini_batch_s2t(self, data, s2t)
            mini_batch.nonfinite = mini_batch.masked is None
    return _VERL_TRAIN_BATCH(self, data, loss_function=with_entropy(loss_function, mini_batch))


_train_batch._stapo_hook = True  # type: ignore[attr-defined]

_ENGINE_BASE = "verl.workers.engine.base"
_RAY_TRAINER = "verl.trainer.ppo.ray_trainer"


def _patch_base_engine(module) -> None:
    global _VERL_TRAIN_BATCH
    engine = module.BaseEngine
    current = engine.train_batch
    if getattr(current, "_stapo_hook", False):
        return
    _VERL_TRAIN_BATCH = current
    engine.train_batch = _train_batch


def keep_old_entropies(trainer_config, old_log_prob) -> None:
    """With `stapo.decision_policy=old`, copy the entropies of verl's old-log-prob pass (`entropys`, which the
    driver logs and then drops) to `OLD_ENTROPY_KEY`, so they reach the actor update beside `old_log_probs`."""
    actor = trainer_config.actor_rollout_ref.actor
    spec, settings = _stapo_settings_for(actor)
    if spec is not None and spec.applies_s2t and settings.s2t.decision_policy == "old":
        old_log_prob.batch[OLD_ENTROPY_KEY] = old_log_prob.batch["entropys"].clone()


def _patch_ray_trainer(module) -> None:
    trainer = module.RayPPOTrainer
    current = trainer._compute_old_log_prob
    if getattr(current, "_stapo_hook", False):
        return

    @functools.wraps(current)
    def compute_old_log_prob(self, batch, *args, **kwargs):
        old_log_prob, *rest = current(self, batch, *args, **kwargs)
        keep_old_entropies(self.config, old_log_prob)
        return (old_log_prob, *rest)

    compute_old_log_prob._stapo_hook = True  # type: ignore[attr-defined]
    trainer._compute_old_log_prob = compute_old_log_prob


_PATCHES = {_ENGINE_BASE: _patch_base_engine, _RAY_TRAINER: _patch_ray_trainer}
_PATCHED_CLASS = {_ENGINE_BASE: "BaseEngine", _RAY_TRAINER: "RayPPOTrainer"}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs a module's patch (`_PATCHES`) right after verl's module executes (its first import)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader, _PATCHES[fullname])
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


def install_engine_hook() -> None:
    """Wrap verl's `BaseEngine.train_batch` (what every verl engine runs once per PPO mini-batch:
    `TrainingWorker.train_batch` calls it with the worker's loss function) and the driver's
    `RayPPOTrainer._compute_old_log_prob` (`keep_old_entropies`); idempotent.

    Done when each module is imported (now, if it already is): importing verl's engines from the plugin
    would resolve verl's accelerator platform before other plugins could register theirs."""
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None and hasattr(module, _PATCHED_CLASS[name]):
            patch(module)
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
