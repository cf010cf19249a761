"""The STAPO math, once, in pure PyTorch (no engine imports).

    group_advantages   GRPO / Dr.GRPO / batch-scaled outcome advantages
    s2t_mask           STAPO's spurious-token mask (A > 0, p < tau_p, H < tau_h)
    s2t_mask_with_counts  the same, with the counts engines log (p < tau_p, H < tau_h, silenced)
    high_entropy_mask  20-Entropy's top-rho entropy mask
    policy_loss        PPO-clip loss with verl's aggregation modes and global denominators
    stapo_loss         policy_loss over the valid tokens S2T does not silence
    high_entropy_loss  20-Entropy: gradient for the top-rho entropy tokens, full denominator
    token_logprobs_entropy    per-token log-prob / entropy / collision from logits, chunked, float32
    lm_head_logprobs_entropy  the same from hidden states + LM-head weight, never holding [N, V] logits
"""

from stapo.core.advantages import ADVANTAGE_SCALES, group_advantages, zero_variance_group_fraction
from stapo.core.head import token_logprobs_entropy
from stapo.core.lm_head import (
    TRLChunkedLogProbAdapter,
    causal_lm_head_params,
    causal_lm_hidden_states,
    lm_head_logprobs_entropy,
)
from stapo.core.losses import (
    AGGREGATIONS,
    aggregate,
    global_token_count,
    high_entropy_loss,
    policy_loss,
    stapo_loss,
)
from stapo.core.masks import entropy_quantile, high_entropy_mask, quantile_linear, s2t_mask, s2t_mask_with_counts
from stapo.core.presets import PRESETS, MethodPreset, get_preset
from stapo.core.stats import entropy_change_first_order, grad_norm_proxy, masked_summary, token_fractions

__all__ = [
    "ADVANTAGE_SCALES",
    "AGGREGATIONS",
    "TRLChunkedLogProbAdapter",
    "causal_lm_head_params",
    "causal_lm_hidden_states",
    "lm_head_logprobs_entropy",
    "PRESETS",
    "MethodPreset",
    "aggregate",
    "entropy_quantile",
    "get_preset",
    "global_token_count",
    "entropy_change_first_order",
    "grad_norm_proxy",
    "group_advantages",
    "high_entropy_loss",
    "high_entropy_mask",
    "masked_summary",
    "policy_loss",
    "quantile_linear",
    "s2t_mask",
    "s2t_mask_with_counts",
    "stapo_loss",
    "token_fractions",
    "token_logprobs_entropy",
    "zero_variance_group_fraction",
]
