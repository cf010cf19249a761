"""`STAPOConfig`: TRL's `GRPOConfig` plus the method preset, S2T thresholds and run switches.

Preset -> TRL options (`__post_init__`). These TRL fields default to None here, meaning "take the
preset's value"; any value the user passes (even one equal to TRL's default) is kept:

    advantage_scale group | none | batch    -> scale_rewards
    clip_low / clip_high                    -> epsilon / epsilon_high
    agg token-mean                          -> loss_type "dapo" (global token count)
    agg seq-mean-token-sum-norm             -> loss_type "dr_grpo"
    (all presets)                           -> beta = 0 (no KL, no reference model)
    20-entropy's rho                        -> top_entropy_quantile

`clip_ratio_c` (dual clip for A < 0) is not a TRL option: None takes the preset's (justrl, stapo: 10;
the others: none), and `STAPOTrainer` passes it to `stapo.core.policy_loss`.

Ranges. `epsilon`, `epsilon_high`, `clip_ratio_c` and `top_entropy_quantile` are the loss settings
every engine shares (`LOSS_SETTING_NAMES` -> the core's names): their rules are `stapo.core.loss_settings`'.
The fields STAPOConfig adds or restricts have theirs in `FIELD_RULES`. `stapo_field_error` answers
for both, and `stapo train`'s run config (`stapo.config`) asks it, so a config file and this class
accept the same values.

S2T thresholds (`tau_p`, `tau_h`, `tau_h_quantile`, `tau_h_population`, `tau_h_max`, `tau_h_scope`,
`decision_policy`, `inert_warning_steps`): None takes `method`'s `preset.s2t_settings`, the defaults of
`stapo.core.S2TSettings`, which also checks them. Methods other than stapo do not apply S2T: their
thresholds only measure what it would silence (logged as stapo/s2t_*), so the configs of a comparison can
differ only in `method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from stapo.core import PRESETS, S2T_DEFAULTS, S2T_FIELDS, S2TSettings, get_preset
from stapo.core.loss_settings import loss_setting_error

__all__ = [
    "AGG_TO_LOSS_TYPE",
    "FIELD_RULES",
    "LOSS_SETTING_NAMES",
    "PRESET_OPTIONS",
    "STAPOConfig",
    "SUPPORTED_LOSS_TYPES",
    "stapo_field_error",
    "top_entropy_quantile_error",
]

# TRL fields a preset sets unless the user set them explicitly.
PRESET_OPTIONS = ("loss_type", "epsilon", "epsilon_high", "scale_rewards", "beta", "top_entropy_quantile")
AGG_TO_LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
_MEASURED_ONLY = "Other methods: measured only."

# STAPOConfig's spelling of the loss settings every engine shares -> the core's (stapo.core.loss_settings).
LOSS_SETTING_NAMES = {
    "epsilon": "clip_low",
    "epsilon_high": "clip_high",
    "clip_ratio_c": "clip_ratio_c",
    "top_entropy_quantile": "top_entropy_quantile",
}


def _int_at_least(lowest: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lowest


# The other fields STAPOConfig adds to GRPOConfig or restricts: name -> (rule, problem).
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "beta": (lambda v: not isinstance(v, bool) and v == 0, "must be 0 (the GRPO-family methods here use no KL term)"),
    "loss_type": (lambda v: v in SUPPORTED_LOSS_TYPES,
                  f"must be one of {', '.join(SUPPORTED_LOSS_TYPES)} for STAPOTrainer"),
    "capture_rollouts_every": (_int_at_least(0), "must be an int >= 0 (0: off)"),
    "capture_max_samples": (_int_at_least(1), "must be an int >= 1"),
    "max_nonfinite_steps": (_int_at_least(1),
                            "must be an int >= 1 (skipped non-finite steps in a row before stopping)"),
    "fused_lm_head": (lambda v: v is None or isinstance(v, bool), "must be true, false or null (auto)"),
}


def stapo_field_error(name: str, value: Any) -> str | None:
    """The problem with `value` for STAPOConfig field `name` ("must be ..."), or None when it is valid or
    the field has no rule here (TRL's own fields). None is not a value: it means the preset's."""
    if name in LOSS_SETTING_NAMES:
        return loss_setting_error(LOSS_SETTING_NAMES[name], value)
    rule = FIELD_RULES.get(name)
    if rule is None:
        return None
    try:
        ok = rule[0](value)
    except TypeError:  # a value of another type
        ok = False
    return None if ok else rule[1]


def top_entropy_quantile_error(method: str, value: Any) -> str | None:
    """rho is read only by a method whose token filter uses it (20-entropy); elsewhere it must be 1.0
    (every token keeps its gradient) or None (the preset's, which is 1.0)."""
    preset = get_preset(method)
    if preset.filter.uses_top_entropy_quantile or value is None or value == 1.0:
        return None
    users = " or ".join(repr(n) for n, p in PRESETS.items() if p.filter.uses_top_entropy_quantile)
    return f"applies only to method {users} (method is {method!r})"


@dataclass
class STAPOConfig(GRPOConfig):
    """`GRPOConfig` plus the STAPO method switch. See the module docstring for the preset mapping."""

    method: str = field(
        default="stapo",
        metadata={"help": "Method preset: grpo, dapo, dr_grpo, 20-entropy, justrl or stapo (stapo.core.PRESETS)."},
    )
    tau_p: float | None = field(
        default=None,
        metadata={"help": f"S2T probability threshold (None: {S2T_DEFAULTS['tau_p']}; 0 = mask off). {_MEASURED_ONLY}"},
    )
    tau_h: float | None = field(
        default=None,
        metadata={"help": f"S2T absolute entropy threshold in nats; None: use tau_h_quantile. {_MEASURED_ONLY}"},
    )
    tau_h_quantile: float | None = field(
        default=None,
        metadata={"help": f"S2T entropy threshold as a quantile of tau_h_population's entropies "
                  f"(None: {S2T_DEFAULTS['tau_h_quantile']})."},
    )
    tau_h_population: str | None = field(
        default=None,
        metadata={"help": f"Tokens the tau_h quantile is taken over: valid | low_prob | candidates "
                  f"(None: {S2T_DEFAULTS['tau_h_population']})."},
    )
    tau_h_max: float | None = field(
        default=None,
        metadata={"help": f"A quantile tau_h is capped at this many nats (inf: no cap; "
                  f"None: {S2T_DEFAULTS['tau_h_max']:.4g})."},
    )
    tau_h_scope: str | None = field(
        default=None,
        metadata={"help": f"The batch the tau_h quantile is taken over: mini_batch (one optimizer step, every "
                  f"micro-batch and rank) | micro_batch (None: {S2T_DEFAULTS['tau_h_scope']})."},
    )
    decision_policy: str | None = field(
        default=None,
        metadata={"help": f"Whose p and H the S2T decision reads: current (pi_theta; one no-grad forward per step "
                  f"when a step has several micro-batches) | old (pi_old: the values of the old-log-prob pass, "
                  f"no extra forward) (None: {S2T_DEFAULTS['decision_policy']})."},
    )
    inert_warning_steps: int | None = field(
        default=None,
        metadata={"help": f"Warn once when S2T silenced nothing for this many optimizer steps in a row "
                  f"(0: never; None: {S2T_DEFAULTS['inert_warning_steps']})."},
    )
    clip_ratio_c: float | None = field(
        default=None, metadata={"help": "Dual-clip bound for A < 0 (> 1; None: the preset's, justrl/stapo 10)."}
    )
    # TRL options the preset fills (None = the preset's value, set in __post_init__ before GRPOConfig's own
    # set-up sees them): wider than GRPOConfig's types on purpose, hence the ignores.
    loss_type: str | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": "dapo | bnpo | grpo | dr_grpo (None: preset)."})
    epsilon: float | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": "Lower clip epsilon (None: preset)."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clip epsilon (None: preset)."})
    scale_rewards: str | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": "group | batch | none (None: preset)."})
    beta: float | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": "KL coefficient; must be 0 (None: 0)."})
    top_entropy_quantile: float | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": "20-Entropy's rho (20-entropy only; None: the preset's)."}
    )
    metrics_jsonl: bool = field(
        default=True, metadata={"help": "Append every logged step to <output_dir>/metrics.jsonl."}
    )
    capture_rollouts_every: int = field(
        default=0, metadata={"help": "Capture token-level rollouts every N optimizer steps (0: off)."}
    )
    capture_max_samples: int = field(default=16, metadata={"help": "Completions captured per capture step."})
    fused_lm_head: bool | None = field(
        default=None,
        metadata={
            "help": "Compute log-probs/entropies with stapo's memory-lean LM head in TRL's fused-head slot "
            "(None: auto = on unless the model softcaps logits or DeepSpeed ZeRO-3 is used)."
        },
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={"help": "Stop after this many optimizer steps in a row with a non-finite loss or gradient "
                  "(each such step is skipped)."},
    )

    def __post_init__(self):
        preset = get_preset(self.method)  # ValueError listing the known methods
        self.explicit_options = tuple(name for name in PRESET_OPTIONS if getattr(self, name) is not None)
        defaults = {
            "loss_type": AGG_TO_LOSS_TYPE[preset.agg],
            "epsilon": preset.clip_low,
            "epsilon_high": preset.clip_high,
            "scale_rewards": preset.advantage_scale,
            "beta": 0.0,
            "top_entropy_quantile": preset.top_entropy_quantile if preset.filter.uses_top_entropy_quantile else 1.0,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        # S2TSettings is the one validator ("tau_p must be ..."); None keeps the preset's value.
        settings = S2TSettings.resolve({name: getattr(self, name) for name in S2T_FIELDS}, base=preset.s2t_settings)
        for name in S2T_FIELDS:
            setattr(self, name, getattr(settings, name))
        if self.clip_ratio_c is None:
            self.clip_ratio_c = preset.clip_ratio_c
        self._check_fields()  # before GRPOConfig's own set-up, so a bad value gets this one error
        super().__post_init__()
        self._check_supported(preset)

    @property
    def s2t_settings(self) -> S2TSettings:
        """The S2T thresholds of this run (applied by stapo, measured by the other methods)."""
        return S2TSettings(**{name: getattr(self, name) for name in S2T_FIELDS})

    def _check_fields(self) -> None:
        for name in (*FIELD_RULES, *LOSS_SETTING_NAMES):
            value = getattr(self, name)
            if name == "clip_ratio_c" and value is None:  # the preset has no dual clip
                continue
            problem = stapo_field_error(name, value)
            if problem is not None:
                raise ValueError(f"{name} {problem}, got {value!r}")
        problem = top_entropy_quantile_error(self.method, self.top_entropy_quantile)
        if problem is not None:
            raise ValueError(f"top_entropy_quantile {problem}")

    def _check_supported(self, preset) -> None:
        keeps_all_valid = preset.filter.uses_top_entropy_quantile and preset.filter.denominator == "valid"
        if keeps_all_valid and self.loss_type == "grpo":
            raise ValueError(
                "loss_type='grpo' cannot keep 20-Entropy's denominator (all valid tokens); "
                "use dapo, bnpo or dr_grpo with method='20-entropy'"
            )
        ga, spg = self.gradient_accumulation_steps, self.steps_per_generation or self.gradient_accumulation_steps
        if ga > 1 and spg % ga != 0 and (self.loss_type == "dapo" or preset.filter.applies_s2t):
            raise ValueError(
                f"each optimizer step's micro-batches must come from one generation (the token-mean denominator is "
                f"the step's own tokens, and S2T decides over the whole step): steps_per_generation ({spg}) must be "
                f"a multiple of gradient_accumulation_steps ({ga})"
            )
        unsupported = {
            "importance_sampling_level": (self.importance_sampling_level, "token"),
            "delta": (self.delta, None),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold, None),
            "entropy_coef": (self.entropy_coef, 0.0),
            "use_adaptive_entropy": (self.use_adaptive_entropy, False),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"{name}={value!r} is not supported by STAPOTrainer (use {supported!r})")
