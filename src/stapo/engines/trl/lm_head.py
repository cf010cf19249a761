"""stapo's LM head in TRL's fused-head slot.

TRL 1.16 patches the model so that its training forward stops at the hidden states and a chunked head
(`trl.trainer.utils._ChunkedLogProbFunction`, a private name looked up at call time) turns them into
per-token log-probs and entropies. `TRLChunkedLogProbAdapter` has that class's `apply` signature and
computes the head with `stapo.core.lm_head_logprobs_entropy` (float32 logits, O(rows x vocab chunk)
extra memory); `stapo_lm_head_in_trl()` puts it in the slot for the duration of a block.

`STAPOTrainer` (`fused_lm_head`) uses the block around each `_get_per_token_logps_and_entropies`
call only, so other trainers in the same process keep TRL's head. This is the only stapo module that
touches TRL's private head API (listed, with the parameters the adapter mirrors, in `internals.py`).
"""

from __future__ import annotations

import contextlib

from stapo.core import lm_head as core_lm_head
from stapo.engines.trl.internals import FUSED_HEAD_SLOT as _SLOT

__all__ = ["TRLChunkedLogProbAdapter", "stapo_lm_head_in_trl", "trl_has_fused_head_slot"]


class TRLChunkedLogProbAdapter:
    """Drop-in for TRL 1.16's fused head (`trl.trainer.utils._ChunkedLogProbFunction`), computed here.

    TRL's patched forward (`add_fused_lm_head`) calls
    `apply(hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`
    and expects `(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`, `None` where not asked.
    Swapping this class in keeps TRL's backbone call, masking, DDP/PEFT handling and weight gathering,
    and replaces only the head math (float32 logits from the GEMM instead of compute-dtype tiles).

    Limits, each refused with a ValueError rather than computed wrong: softcapped logits, the
    `mean_logits` / `is_top1` outputs. The entropy is detached, so a trainer with an entropy bonus
    (`entropy_coef != 0` or adaptive entropy) must not use this adapter. Under DeepSpeed ZeRO-3 the
    head weight is gathered only around the forward call; use TRL's own head there.
    """

    SUPPORTED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs")

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        if final_logit_softcapping is not None:
            raise ValueError(
                f"final_logit_softcapping={final_logit_softcapping}: "
                "the stapo lm head does not support softcapped logits"
            )
        extra = [o for o in outputs if o not in TRLChunkedLogProbAdapter.SUPPORTED_OUTPUTS]
        if extra:
            raise ValueError(f"outputs {extra} are not supported by the stapo lm head (supported: "
                             f"{TRLChunkedLogProbAdapter.SUPPORTED_OUTPUTS})")
        want_collision = "log_sum_sq_probs" in outputs
        # through the module, so the head in use is always stapo.core's current one
        res = core_lm_head.lm_head_logprobs_entropy(hidden, weight, targets, bias=bias, temperature=temperature,
                                                    logit_scale=logit_scale, return_collision=want_collision)
        entropy = res[1] if "entropy" in outputs else None
        log_sum_sq = res[2].log() if want_collision else None
        return res[0], entropy, log_sum_sq, None, None


def trl_has_fused_head_slot() -> bool:
    """Whether the installed TRL has the fused-head slot this adapter fills."""
    import trl.trainer.utils as trl_utils

    return hasattr(trl_utils, _SLOT)


@contextlib.contextmanager
def stapo_lm_head_in_trl():
    """Within the block, TRL's fused-head slot (`trl.trainer.utils._ChunkedLogProbFunction`, looked up by
    the patched forward at call time) is `TRLChunkedLogProbAdapter`; restored on exit."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, _SLOT)
    setattr(trl_utils, _SLOT, TRLChunkedLogProbAdapter)
    try:
        yield
    finally:
        setattr(trl_utils, _SLOT, original)
