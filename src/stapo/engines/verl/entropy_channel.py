"""The entropy side channel: what a verl policy loss gets beyond verl's policy-loss signature.

verl's policy-loss signature is
    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
and carries no entropy. The actor's loss function (verl's `ppo_loss`, bound by the engine worker) gets
the micro-batch's `model_output`, entropies included when `actor.calculate_entropy=True`, and calls the
registered policy loss without them. `with_entropy` wraps that loss function (the engine hook does, for
each mini-batch): each call runs with its micro-batch's entropies, the data-parallel group, what the hook
knows of the whole mini-batch (`MiniBatchS2T`) and, with `decision_policy=old`, pi_old's entropies (kept in
the actor batch under `OLD_ENTROPY_KEY`) in a context variable, which the registered losses read
(`current_inputs`); verl's `ppo_loss` runs unchanged. Tests call the losses under `entropy_context`.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OLD_ENTROPY_KEY", "MiniBatchS2T", "current_inputs", "entropy_context", "padded", "with_entropy"]

# pi_old's entropies in the actor-update batch, kept from verl's old-log-prob pass (`keep_old_entropies`)
OLD_ENTROPY_KEY = "old_entropys"


@dataclass
class MiniBatchS2T:
    """One `train_batch` call (one optimizer step) on this rank, as the losses of its micro-batches see it.

    micro_batches  how many micro-batches this rank's mini-batch splits into (None: not known)
    threshold      S2T's tau_h over the whole mini-batch, every rank (the pre-pass); None: not taken
    masked         tokens S2T silences in the whole mini-batch, summed over the ranks (the pre-pass)
    loss_calls     loss calls so far in this mini-batch
    nonfinite      the pre-pass met non-finite values (no threshold taken)
    """

    micro_batches: int | None = None
    threshold: torch.Tensor | None = None
    masked: float | None = None
    loss_calls: int = 0
    nonfinite: bool = False  # the pre-pass met NaN/inf values: each loss finds its own and the step is skipped


@dataclass(frozen=True)
class _LossInputs:
    entropy: torch.Tensor  # [B, T], aligned with log_prob / response_mask, detached
    dp_group: Any = None
    mini_batch: MiniBatchS2T | None = None
    old_entropy: torch.Tensor | None = None  # [B, T] pi_old's (decision_policy=old), else None


_INPUTS: contextvars.ContextVar[_LossInputs | None] = contextvars.ContextVar("stapo_loss_inputs", default=None)


class entropy_context:
    """`with entropy_context(entropy, dp_group): ...` — the entropies [B, T] the registered losses read
    (what the engine hook provides for each micro-batch; tests call the losses under it directly)."""

    def __init__(self, entropy: torch.Tensor, dp_group=None, mini_batch: MiniBatchS2T | None = None,
                 old_entropy: torch.Tensor | None = None):
        self._value = _LossInputs(entropy.detach(), dp_group, mini_batch,
                                  None if old_entropy is None else old_entropy.detach())
        self._token: contextvars.Token[_LossInputs | None] | None = None

    def __enter__(self):
        self._token = _INPUTS.set(self._value)
        return self._value

    def __exit__(self, *exc):
        assert self._token is not None  # set by __enter__
        _INPUTS.reset(self._token)
        return False


def current_inputs(loss_mode: str) -> _LossInputs:
    """What the engine hook provides for the micro-batch whose loss is running (`loss_mode` names it in the error)."""
    value = _INPUTS.get()
    if value is None:
        raise ValueError(
            f"policy_loss.loss_mode={loss_mode} needs per-token entropies: set "
            "actor_rollout_ref.actor.calculate_entropy=True and import stapo.engines.verl in the workers "
            "(launch with `python -m stapo.engines.verl.main`, which does both); the loss runs inside verl's "
            "engine `train_batch`"
        )
    return value


def padded(tensor, data) -> torch.Tensor:
    """A per-token tensor of verl's engine output (no padding) as [B, T], aligned with `data`'s response mask."""
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
        with entropy_context(padded(entropy, data), kwargs.get("dp_group", None), mini_batch, old_entropy):
            return loss_function(*args, **kwargs)

    call._stapo_with_entropy = True  # type: ignore[attr-defined]
    return call
