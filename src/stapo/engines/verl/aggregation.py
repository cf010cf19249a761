"""verl's loss aggregation in `stapo.core`'s terms.

verl's `agg_loss` returns, per micro-batch on one of `dp` ranks,

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
known before the micro-batch's loss: from the engine hook's pre-pass, or when the mini-batch is one
micro-batch per rank (all-reduced in the loss). Only with `micro_batch` scope and several micro-batches
per rank is it unknown; the silenced tokens then stay in the denominator (a relative change of the
step's gradient scale equal to the masked fraction, `actor/s2t_masked_frac`). `silenced_share` is that
count in verl's per-rank share.
"""

from __future__ import annotations

from typing import Any

from stapo.core import ALL_RANKS
from stapo.engines.verl.config import actor_clip_settings
from stapo.engines.verl.entropy_channel import MiniBatchS2T

__all__ = ["core_loss_kwargs", "global_batch_info", "silenced_share"]


def core_loss_kwargs(config, loss_agg_mode: str) -> dict:
    """`stapo.core.policy_loss` keyword arguments equal to verl's vanilla loss under `config`.

    Reads the clip range (`clip_ratio_low/high`, falling back to `clip_ratio`), `clip_ratio_c`
    (dual clip, verl's default 3.0) and `config.global_batch_info` (dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor) as verl's `agg_loss` does; see the module docstring.
    """
    if config is None:
        raise ValueError("the actor config is required (verl passes it as `config`)")
    info = global_batch_info(config)
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


def global_batch_info(config) -> dict:
    """verl's `config.global_batch_info` as `agg_loss` reads it (dp_size, batch_num_tokens, global_batch_size,
    loss_scale_factor), with its defaults."""
    info = dict(config.get("global_batch_info", None) or {})
    scale = info.get("loss_scale_factor", None)
    return {
        "dp_size": int(info.get("dp_size", 1) or 1),
        "batch_num_tokens": info.get("batch_num_tokens", None),
        "global_batch_size": info.get("global_batch_size", None),
        "loss_scale_factor": config.get("loss_scale_factor", None) if scale is None else scale,
    }


def silenced_share(loss_agg_mode: str, config, mini_batch: MiniBatchS2T | None):
    """`filtered_policy_loss`'s `num_silenced` in verl's per-rank share (÷ dp): the tokens S2T silences in the
    whole mini-batch where the hook counted them (pre-pass, or pi_old's values), ALL_RANKS where this
    micro-batch is the rank's mini-batch, None where unknown (micro_batch scope over several micro-batches:
    the silenced tokens then stay in the denominator). token-sum has a unit denominator: nothing to subtract."""
    if loss_agg_mode == "token-sum":
        return 0.0
    if mini_batch is not None and mini_batch.masked is not None:
        return mini_batch.masked / global_batch_info(config)["dp_size"]
    if mini_batch is not None and mini_batch.micro_batches == 1:
        return ALL_RANKS
    return None
