"""Shared helpers of the verl plugin tests (imported by name: `from verl_fakes import ...`).

    make_actor_config(**kw)     a verl `ActorConfig` (the dataclass the engine workers use)
    make_micro_batch(...)       a verl actor micro-batch (TensorDict, padded prompts) + model output
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Each test module starts with `pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)`, so the
# whole directory is reported as skipped, with this reason, when verl is missing. (No folder on the
# tests' sys.path is named `verl`: the plugin's tests live in tests/engines/verl, and tests/engines
# holds no module, so `verl` is always the installed package.)
VERL_MODULE = "verl"
VERL_SKIP_REASON = (
    "verl is not installed; `pip install 'verl==0.9.1'` (see docs/verl.md) to run the verl plugin tests"
)

import torch

torch.set_num_threads(1)


def make_actor_config(loss_mode="stapo", stapo=None, loss_agg_mode="token-mean", clip_low=0.2, clip_high=0.28, **kw):
    from verl.workers.config import ActorConfig

    from stapo.engines.verl import StapoPolicyLossConfig, VerlStapoSettings

    policy_loss = StapoPolicyLossConfig(loss_mode=loss_mode, stapo=VerlStapoSettings(**(stapo or {})))
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=clip_low,
        clip_ratio_high=clip_high,
        loss_agg_mode=loss_agg_mode,
        policy_loss=policy_loss,
        use_torch_compile=False,
        **kw,
    )



def make_micro_batch(log_prob, old_log_prob, advantages, entropy, response_mask, prompt_len=3, global_info=None):
    """A verl actor micro-batch in padded layout and the flat (no-padding) model output whose
    `no_padding_2_padding` is `log_prob` / `entropy` on the valid response tokens.

    Returns (data, model_output, flat_log_prob); `flat_log_prob` is the leaf to differentiate.
    `response_mask` must be left-aligned (valid tokens first in each row)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    bsz, resp_len = log_prob.shape
    lengths = response_mask.sum(-1).long()
    attention = torch.cat([torch.ones(bsz, prompt_len, dtype=torch.long), response_mask.long()], dim=1)
    flat_lp, flat_ent = [], []
    for i in range(bsz):
        n = int(lengths[i])
        # Position p of the flat output predicts token p + 1: the response's log-probs sit at
        # [prompt_len - 1, prompt_len - 1 + n) of the row's prompt_len + n tokens.
        lp_row = torch.zeros(prompt_len + n, dtype=log_prob.dtype)
        ent_row = torch.zeros(prompt_len + n, dtype=entropy.dtype)
        lp_row[prompt_len - 1 : prompt_len - 1 + n] = log_prob[i, :n].detach()
        ent_row[prompt_len - 1 : prompt_len - 1 + n] = entropy[i, :n]
        flat_lp.append(lp_row)
        flat_ent.append(ent_row)
    flat_log_prob = torch.cat(flat_lp).requires_grad_(True)
    data = TensorDict(
        {
            "prompts": torch.ones(bsz, prompt_len, dtype=torch.long),
            "responses": torch.ones(bsz, resp_len, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": response_mask.long(),
            "old_log_probs": old_log_prob,
            "advantages": advantages,
        },
        batch_size=[bsz],
    )
    info = {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}
    info.update(global_info or {})
    tu.assign_non_tensor(data, **info)
    model_output = {"log_probs": flat_log_prob, "entropy": torch.cat(flat_ent)}
    return data, model_output, flat_log_prob

