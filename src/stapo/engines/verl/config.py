"""The `stapo` block of verl's actor config: `actor_rollout_ref.actor.policy_loss.stapo.*`.

verl builds `actor.policy_loss` from its Hydra node with `_target_`, so the extra block needs a
`PolicyLossConfig` that knows it: `StapoPolicyLossConfig`. `python -m stapo.engines.verl.main` selects it
(and switches entropy on) whenever `loss_mode` is `stapo` or `20-entropy`; a plain
`verl.trainer.main_ppo` launch needs `actor_rollout_ref.actor.policy_loss._target_=
stapo.engines.verl.config.StapoPolicyLossConfig` when it sets any `stapo.*` key.

The block's dataclass is `VerlStapoSettings`: the token filters' thresholds as verl reads them (not a
whole config of a run, as TRL's `STAPOConfig` is; `StapoConfig`, its former name, is a deprecated alias).
The S2T thresholds' defaults, ranges and meanings are `stapo.core.S2TSettings`' (checked by its
validator, errors prefixed `stapo.`), the paper's rule included: tau_h per PPO mini-batch
(`tau_h_scope=mini_batch`, which the engine hook in `stapo.engines.verl.engine_hook` provides); 20-Entropy's
rho defaults to its preset's, its range is `stapo.core.loss_settings`' rule.

The clip range and dual-clip bound are verl's own actor fields (`actor.clip_ratio_low`, `_high`, `_c`);
`actor_clip_settings` reads them as verl's vanilla loss does and checks them by the rules every engine
shares (`stapo.core.loss_settings`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from verl.base_config import BaseConfig
from verl.workers.config import PolicyLossConfig

from stapo.core import S2TSettings, TokenFilterSpec, get_preset, get_token_filter, s2t_errors
from stapo.core.loss_settings import (
    check_clip_high,
    check_clip_low,
    check_clip_ratio_c,
    check_top_entropy_quantile,
    loss_setting_error,
)

# verl's policy-loss modes this plugin registers, and the stapo.core token filter each one applies. What a
# loss does (S2T or not, its denominator, whether it reads rho) comes from the filter's properties.
LOSS_MODE_FILTERS = {"stapo": get_preset("stapo").token_filter, "20-entropy": get_preset("20-entropy").token_filter}
LOSS_MODES = tuple(LOSS_MODE_FILTERS)
POLICY_LOSS_TARGET = "stapo.engines.verl.config.StapoPolicyLossConfig"
# The S2T settings a verl loss reads (inert_warning_steps counts loss calls = micro-batches on a rank here).
S2T_KEYS = (
    "tau_p", "tau_h", "tau_h_quantile", "tau_h_population", "tau_h_max", "tau_h_scope", "decision_policy",
    "inert_warning_steps",
)
STAPO_KEYS = S2T_KEYS + ("top_entropy_quantile",)

_S2T = get_preset("stapo").s2t_settings
# The tau_h scope a verl run takes by default: the paper's (per PPO mini-batch), S2TSettings' default.
# With several micro-batches per mini-batch it costs one forward-only pass over the mini-batch per
# optimizer step (docs/verl.md); `micro_batch` takes each micro-batch's own quantile instead.
VERL_TAU_H_SCOPE = _S2T.tau_h_scope
_HIGH_ENTROPY = get_preset("20-entropy")
_TOP_ENTROPY_QUANTILE = check_top_entropy_quantile(_HIGH_ENTROPY.top_entropy_quantile)  # 20-Entropy's rho


def loss_mode_filter(loss_mode: str) -> TokenFilterSpec | None:
    """The token filter (`stapo.core.TOKEN_FILTERS` entry) a verl loss mode applies; None for verl's own modes."""
    name = LOSS_MODE_FILTERS.get(loss_mode)
    return None if name is None else get_token_filter(name)


@dataclass
class VerlStapoSettings(BaseConfig):
    """The `actor.policy_loss.stapo` block: thresholds of the two token filters.

    tau_p, tau_h, tau_h_quantile, tau_h_population, tau_h_max, tau_h_scope
                          STAPO's S2T settings (`stapo.core.S2TSettings`); the quantile is taken
                          over every data-parallel rank, per PPO mini-batch (`mini_batch`) or per
                          micro-batch (`micro_batch`); decision_policy: the current policy's p and
                          H (`current`) or the old policy's (`old`: the values verl's old-log-prob
                          pass computes; no pre-pass).
    inert_warning_steps   warn (rank 0) when S2T silenced nothing in this many loss calls (micro-batches)
                          in a row; 0: never.
    top_entropy_quantile  20-Entropy: the fraction rho of highest-entropy tokens that keep a
                          gradient ((0, 1]).
    """

    tau_p: float = _S2T.tau_p
    tau_h: float | None = _S2T.tau_h
    tau_h_quantile: float = _S2T.tau_h_quantile
    tau_h_population: str = _S2T.tau_h_population
    tau_h_max: float = _S2T.tau_h_max
    tau_h_scope: str = VERL_TAU_H_SCOPE
    decision_policy: str = _S2T.decision_policy
    inert_warning_steps: int = _S2T.inert_warning_steps
    top_entropy_quantile: float = _TOP_ENTROPY_QUANTILE

    def __post_init__(self):
        values = {name: getattr(self, name) for name in S2T_KEYS}
        errors = [f"stapo.{name} {msg}, got {values[name]!r}"
                  for name, msg in s2t_errors(values, none_means_default=False).items()]
        if errors:
            raise ValueError("; ".join(errors))
        check_top_entropy_quantile(self.top_entropy_quantile, "stapo.top_entropy_quantile")

    @property
    def s2t(self) -> S2TSettings:
        return S2TSettings(**{name: getattr(self, name) for name in S2T_KEYS})


@dataclass
class StapoPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` plus the `stapo` block."""

    stapo: VerlStapoSettings = field(default_factory=VerlStapoSettings)

    def __post_init__(self):
        # Hydra passes a nested block without its own `_target_` as a DictConfig.
        if not isinstance(self.stapo, VerlStapoSettings):
            object.__setattr__(self, "stapo", _to_stapo_config(self.stapo))


def stapo_settings(actor_config) -> VerlStapoSettings:
    """The validated `VerlStapoSettings` of an actor config (dataclass, DictConfig or dict).

    A `policy_loss` without a `stapo` block gets the defaults."""
    policy_loss = _get(actor_config, "policy_loss")
    block = _get(policy_loss, "stapo") if policy_loss is not None else None
    if block is None:
        return VerlStapoSettings()
    return _to_stapo_config(block)


# verl's defaults where the actor config has no such key (those of its vanilla policy loss).
VERL_CLIP_RATIO = 0.2
VERL_CLIP_RATIO_C = 3.0


def actor_clip_settings(actor_config) -> dict[str, float]:
    """`clip_low`, `clip_high`, `clip_ratio_c` for `stapo.core.policy_loss`, read from verl's actor config
    (dataclass, DictConfig or dict) as verl's vanilla loss reads them: `clip_ratio_low` / `clip_ratio_high`,
    each falling back to `clip_ratio`; `clip_ratio_c` (verl's dual clip applies to every loss).

    Checked by the rules every engine shares (`stapo.core.loss_settings`); an error names the actor key the
    value came from. verl has no "no dual clip": a null `clip_ratio_c` is refused, as verl's loss would."""
    clip = _get(actor_config, "clip_ratio", VERL_CLIP_RATIO)
    out: dict[str, float] = {}
    for setting, key, check in (("clip_low", "clip_ratio_low", check_clip_low),
                                ("clip_high", "clip_ratio_high", check_clip_high)):
        value = _get(actor_config, key)
        out[setting] = check(clip, "actor.clip_ratio") if value is None else check(value, f"actor.{key}")
    dual = _get(actor_config, "clip_ratio_c", VERL_CLIP_RATIO_C)
    if dual is None:
        raise ValueError(f"actor.clip_ratio_c {loss_setting_error('clip_ratio_c', dual)}, got None")
    clip_ratio_c = check_clip_ratio_c(dual, "actor.clip_ratio_c")
    assert clip_ratio_c is not None  # None was refused above
    out["clip_ratio_c"] = clip_ratio_c
    return out


def _to_stapo_config(block) -> VerlStapoSettings:
    if block is None:
        return VerlStapoSettings()
    if isinstance(block, VerlStapoSettings):
        return block
    known = set(STAPO_KEYS)
    items = {k: block[k] for k in block.keys() if k != "_target_"}
    unknown = sorted(set(items) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in actor.policy_loss.stapo: {unknown}; known: {sorted(known)}")
    return VerlStapoSettings(**items)


def _get(obj, key: str, default=None):
    """`obj`'s `key`, or `default` when it has no such key (an explicit None stays None)."""
    if obj is None:
        return default
    getter = getattr(obj, "get", None)
    if callable(getter):
        return getter(key, default)
    return getattr(obj, key, default)


DEPRECATED_NAMES = {"StapoConfig": "VerlStapoSettings"}  # former name -> current (removed after one release)


def deprecated_alias(module: str, name: str):
    """The object a deprecated name of `module` stands for, with a DeprecationWarning; AttributeError otherwise.
    `StapoConfig` differed from TRL's `STAPOConfig` only in case."""
    if name not in DEPRECATED_NAMES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    current = DEPRECATED_NAMES[name]
    warnings.warn(f"{module}.{name} is deprecated; use {current} (the same class)", DeprecationWarning, stacklevel=3)
    return globals()[current]


def __getattr__(name: str):
    return deprecated_alias(__name__, name)
