"""The `stapo` block of verl's actor config: `actor_rollout_ref.actor.policy_loss.stapo.*`.

verl builds `actor.policy_loss` from its Hydra node with `_target_`, so the extra block needs a
`PolicyLossConfig` that knows it: `StapoPolicyLossConfig`. `python -m stapo.engines.verl.main` selects it
(and switches entropy on) whenever `loss_mode` is `stapo` or `20-entropy`; a plain
`verl.trainer.main_ppo` launch needs `actor_rollout_ref.actor.policy_loss._target_=
stapo.engines.verl.config.StapoPolicyLossConfig` when it sets any `stapo.*` key.

The S2T thresholds' defaults, ranges and meanings are `stapo.core.S2TSettings`' (checked by its
validator, errors prefixed `stapo.`); 20-Entropy's rho defaults to its preset's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from verl.base_config import BaseConfig
from verl.workers.config import PolicyLossConfig

from stapo.core import S2TSettings, get_preset, s2t_errors

LOSS_MODES = ("stapo", "20-entropy")
POLICY_LOSS_TARGET = "stapo.engines.verl.config.StapoPolicyLossConfig"
# The S2T settings a verl loss reads (inert_warning_steps counts loss calls = micro-batches on a rank here).
S2T_KEYS = (
    "tau_p", "tau_h", "tau_h_quantile", "tau_h_population", "tau_h_max", "tau_h_scope", "inert_warning_steps",
)
STAPO_KEYS = S2T_KEYS + ("top_entropy_quantile",)

_S2T = get_preset("stapo").s2t_settings
# verl calls the loss once per micro-batch and this plugin has no pass over the whole PPO mini-batch
# yet, so the paper's mini-batch scope of the tau_h quantile is not available here: the quantile is
# taken per micro-batch (gathered over the data-parallel ranks), and mini_batch is refused.
VERL_TAU_H_SCOPE = "micro_batch"
_HIGH_ENTROPY = get_preset("20-entropy")


@dataclass
class StapoConfig(BaseConfig):
    """Thresholds of the two token filters.

    tau_p, tau_h, tau_h_quantile, tau_h_population, tau_h_max, tau_h_scope   STAPO's S2T settings (`stapo.core.S2TSettings`);
                          the quantile is taken over every data-parallel rank.
    inert_warning_steps   warn (rank 0) when S2T silenced nothing in this many loss calls (micro-batches)
                          in a row; 0: never.
    top_entropy_quantile  20-Entropy: the fraction rho of highest-entropy tokens that keep a
                          gradient ((0, 1]).
    """

    tau_p: float = _S2T.tau_p
    tau_h: Optional[float] = _S2T.tau_h
    tau_h_quantile: float = _S2T.tau_h_quantile
    tau_h_population: str = _S2T.tau_h_population
    tau_h_max: float = _S2T.tau_h_max
    tau_h_scope: str = VERL_TAU_H_SCOPE
    inert_warning_steps: int = _S2T.inert_warning_steps
    top_entropy_quantile: float = _HIGH_ENTROPY.top_entropy_quantile

    def __post_init__(self):
        values = {name: getattr(self, name) for name in S2T_KEYS}
        errors = [f"stapo.{name} {msg}, got {values[name]!r}"
                  for name, msg in s2t_errors(values, none_means_default=False).items()]
        if not errors and self.tau_h_scope != VERL_TAU_H_SCOPE:
            errors.append(f"stapo.tau_h_scope={self.tau_h_scope!r} is not available with verl yet (the loss sees one "
                          f"micro-batch at a time); set stapo.tau_h_scope={VERL_TAU_H_SCOPE}, or make a PPO "
                          f"mini-batch one micro-batch per rank (the scopes then agree)")
        if errors:
            raise ValueError("; ".join(errors))
        _check_range("stapo.top_entropy_quantile", self.top_entropy_quantile, 0.0, 1.0, low_open=True)

    @property
    def s2t(self) -> S2TSettings:
        return S2TSettings(**{name: getattr(self, name) for name in S2T_KEYS})


@dataclass
class StapoPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` plus the `stapo` block."""

    stapo: StapoConfig = field(default_factory=StapoConfig)

    def __post_init__(self):
        # Hydra passes a nested block without its own `_target_` as a DictConfig.
        if not isinstance(self.stapo, StapoConfig):
            object.__setattr__(self, "stapo", _to_stapo_config(self.stapo))


def _check_range(name: str, value: Any, lo: float, hi: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if low_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}], got {value!r}")


def stapo_settings(actor_config) -> StapoConfig:
    """The validated `StapoConfig` of an actor config (dataclass, DictConfig or dict).

    A `policy_loss` without a `stapo` block gets the defaults."""
    policy_loss = _get(actor_config, "policy_loss")
    block = _get(policy_loss, "stapo") if policy_loss is not None else None
    if block is None:
        return StapoConfig()
    return _to_stapo_config(block)


def _to_stapo_config(block) -> StapoConfig:
    if block is None:
        return StapoConfig()
    if isinstance(block, StapoConfig):
        return block
    known = set(STAPO_KEYS)
    items = {k: block[k] for k in block.keys() if k != "_target_"}
    unknown = sorted(set(items) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in actor.policy_loss.stapo: {unknown}; known: {sorted(known)}")
    return StapoConfig(**items)


def _get(obj, key: str):
    if obj is None:
        return None
    getter = getattr(obj, "get", None)
    if callable(getter):
        return getter(key, None)
    return getattr(obj, key, None)
