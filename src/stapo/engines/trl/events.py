"""`STAPOTrainer`'s own callback events, beside the Trainer's.

A `TrainerCallback` added to the trainer that defines one of these methods has it called; other
callbacks are left alone (the Trainer's `CallbackHandler` would call every callback, and transformers'
`TrainerCallback` has no such methods):

    on_micro_batch_loss(args, state, control, loss: MicroBatchLoss)
        after the loss of each training micro-batch (before its backward), with what the loss step saw
    on_update_decided(args, state, control, skipped: bool)
        once per optimizer step, when the non-finite guard has decided whether its update is taken
        (before `optimizer.step()`), also for the step at which the guard stops the run

Rollout capture (`rollouts.RolloutCaptureCallback`) is built on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stapo.core import S2TDecision

__all__ = ["MICRO_BATCH_LOSS", "UPDATE_DECIDED", "MicroBatchLoss", "notify"]

MICRO_BATCH_LOSS = "on_micro_batch_loss"
UPDATE_DECIDED = "on_update_decided"


@dataclass(frozen=True)
class MicroBatchLoss:
    """One training micro-batch as its loss step saw it (tensors [B, T] of this process's rows)."""

    model: Any                  # the model the loss ran on (for a further no-grad forward)
    inputs: dict                # TRL's micro-batch: prompt/completion ids and masks, advantages, stapo_rewards
    logps: torch.Tensor         # the current policy's per-token log-probs
    entropies: torch.Tensor     # the current policy's per-token entropies
    advantages: torch.Tensor    # per token
    valid: torch.Tensor         # bool: the completion tokens the loss counts
    s2t: S2TDecision            # the loss's S2T decision (applied where the method applies S2T, else measured)


def notify(callbacks, event: str, args, state, control, **kwargs) -> None:
    """Call `event` on every callback that defines it."""
    for callback in callbacks:
        handler = getattr(callback, event, None)
        if handler is not None:
            handler(args, state, control, **kwargs)
