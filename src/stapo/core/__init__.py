"""The STAPO math, once, in pure PyTorch (no engine imports).

    group_advantages   GRPO / Dr.GRPO / batch-scaled outcome advantages
    S2TSettings        STAPO's thresholds (tau_p, tau_h quantile, population, scope): defaults, ranges
    TOKEN_FILTERS      the token-filter registry: none | s2t | high_entropy -> (loss mask, S2T decision),
                       each with its properties (applies S2T, denominator)
    s2t_mask           STAPO's spurious-token mask (A > 0, p < tau_p, H < tau_h)
    s2t_threshold      tau_h over a whole optimizer step (the mini-batch scope)
    high_entropy_mask  20-Entropy's top-rho entropy mask
    policy_loss        PPO-clip loss with verl's aggregation modes and global denominators
    filtered_policy_loss  one micro-batch's loss: token filter -> clipped loss -> aggregation, given the
                       step's tau_h and denominator (what both engines call)
    stapo_loss         filtered_policy_loss with the s2t filter: the valid tokens S2T does not silence
    high_entropy_loss  20-Entropy: gradient for the top-rho entropy tokens, full denominator
    token_logprobs_entropy    per-token log-prob / entropy / collision from logits, chunked, float32
    lm_head_logprobs_entropy  the same from hidden states + LM-head weight, never holding [N, V] logits
"""

from stapo.core.advantages import ADVANTAGE_SCALES, group_advantages, zero_variance_group_fraction
from stapo.core.filters import (
    DENOMINATORS,
    TOKEN_FILTERS,
    FilterParams,
    FilterResult,
    S2TDecision,
    StepS2T,
    TokenFilterSpec,
    apply_token_filter,
    entropy_quantile,
    get_token_filter,
    high_entropy_mask,
    quantile_linear,
    register_token_filter,
    s2t_decision,
    s2t_mask,
    s2t_over_step,
    s2t_population,
    s2t_threshold,
    tau_h_for_fraction,
)
from stapo.core.head import token_logprobs_entropy
from stapo.core.lm_head import (
    causal_lm_head_params,
    causal_lm_hidden_states,
    lm_head_logprobs_entropy,
)
from stapo.core.losses import (
    AGGREGATIONS,
    ALL_RANKS,
    FilteredLoss,
    aggregate,
    filtered_policy_loss,
    global_token_count,
    high_entropy_loss,
    nonfinite_positions,
    policy_loss,
    s2t_metrics,
    stapo_loss,
)
from stapo.core.presets import PRESETS, MethodPreset, get_preset
from stapo.core.settings import (
    DECISION_POLICIES,
    S2T_DEFAULTS,
    S2T_FIELDS,
    S2T_READINGS,
    TAU_H_POPULATIONS,
    TAU_H_SCOPES,
    S2TSettings,
    s2t_errors,
    s2t_field_error,
)
from stapo.core.stats import entropy_change_first_order, grad_norm_proxy, token_fractions

__all__ = [
    "ADVANTAGE_SCALES",
    "AGGREGATIONS",
    "ALL_RANKS",
    "DECISION_POLICIES",
    "FilteredLoss",
    "filtered_policy_loss",
    "nonfinite_positions",
    "DENOMINATORS",
    "FilterParams",
    "FilterResult",
    "MethodPreset",
    "PRESETS",
    "S2TDecision",
    "S2TSettings",
    "S2T_DEFAULTS",
    "S2T_FIELDS",
    "S2T_READINGS",
    "TAU_H_SCOPES",
    "TAU_H_POPULATIONS",
    "TOKEN_FILTERS",
    "TokenFilterSpec",
    "aggregate",
    "apply_token_filter",
    "causal_lm_head_params",
    "causal_lm_hidden_states",
    "entropy_quantile",
    "get_preset",
    "get_token_filter",
    "global_token_count",
    "entropy_change_first_order",
    "grad_norm_proxy",
    "group_advantages",
    "high_entropy_loss",
    "high_entropy_mask",
    "lm_head_logprobs_entropy",
    "policy_loss",
    "quantile_linear",
    "register_token_filter",
    "s2t_decision",
    "s2t_errors",
    "s2t_field_error",
    "StepS2T",
    "s2t_mask",
    "s2t_over_step",
    "s2t_metrics",
    "s2t_population",
    "s2t_threshold",
    "stapo_loss",
    "tau_h_for_fraction",
    "token_fractions",
    "token_logprobs_entropy",
    "zero_variance_group_fraction",
]
