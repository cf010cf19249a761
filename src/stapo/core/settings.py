"""The S2T settings: every default, range and meaning of STAPO's thresholds, written once.

    tau_p             silence only tokens sampled with probability p < tau_p          [0, 1]   (0: silence nothing)
    tau_h             absolute entropy threshold in nats (H < tau_h); None: use the quantile below    >= 0 or None
    tau_h_quantile    tau_h = this quantile of the entropies of `tau_h_population`      [0, 1]
    tau_h_population  the tokens the quantile is taken over:
                        valid       all valid tokens of the batch
                        low_prob    valid tokens with p < tau_p
                        candidates  valid tokens with p < tau_p and A > 0 (the ones S2T could silence)
    tau_h_max         a quantile tau_h is capped at this many nats; inf: no cap
    tau_h_scope       the batch the quantile is taken over:
                        mini_batch   one optimizer step's whole batch (every micro-batch of its
                                     gradient-accumulation window, every data-parallel rank)
                        micro_batch  each micro-batch on its own (gathered across ranks)
    decision_policy   whose p and H the decision reads (A is the rollout's either way):
                        current      pi_theta, the policy being updated (the paper writes pi_theta); with
                                     several micro-batches per step the engine runs one no-grad forward
                                     over the step first
                        old          pi_old, the policy that sampled the rollout: the values the engine
                                     already computes for the old log-probs (no extra forward); on the
                                     first optimizer step after a generation pi_old = pi_theta
    inert_warning_steps  warn once when S2T silenced nothing for this many optimizer steps in a row (0: off)

The defaults are the paper's rule (STAPO, section 3 and its hyper-parameter table): tau_p = 0.002 and
tau_h = the 75% quantile of the candidates' entropies per PPO mini-batch, no cap -- the bottom 75% of
the low-probability tokens of correct responses are silenced, the top 25% kept as exploration.
`S2T_READINGS` names this rule and the one stapo shipped before (tau_p 0.01, the 5% quantile capped at
ln 2); docs/analyze.md "The S2T readings" has what each silences on the embedded model.

Why a population at all. A token of probability p sits at a position of entropy H >= h_b(p) (binary
entropy, nats): the mass 1 - p elsewhere cannot be more concentrated than on one token. A quantile of
*all* valid entropies near zero therefore admits only tokens of tiny p, and silences next to nothing.

Every consumer (the presets, `stapo train`'s run config, the TRL `STAPOConfig`, the verl `stapo`
config, `stapo analyze`) takes its defaults from `S2TSettings` and its checks from `s2t_field_error`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

TAU_H_POPULATIONS = ("valid", "low_prob", "candidates")
TAU_H_SCOPES = ("mini_batch", "micro_batch")
DECISION_POLICIES = ("current", "old")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)


def _check_tau_p(value: Any) -> str | None:
    v = _number(value)
    return None if v is not None and 0.0 <= v <= 1.0 else "must be a number in [0, 1] (0 silences nothing)"


def _check_tau_h(value: Any) -> str | None:
    if value is None:
        return None
    v = _number(value)
    return None if v is not None and v >= 0.0 else "must be a number >= 0 (nats), or null to use tau_h_quantile"


def _check_tau_h_quantile(value: Any) -> str | None:
    v = _number(value)
    return None if v is not None and 0.0 <= v <= 1.0 else "must be a number in [0, 1]"


def _check_tau_h_max(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) and value >= 0
    return None if ok else "must be a number >= 0 (nats; inf: no cap)"


def _check_population(value: Any) -> str | None:
    return None if value in TAU_H_POPULATIONS else f"must be one of {', '.join(TAU_H_POPULATIONS)}"


def _check_scope(value: Any) -> str | None:
    return None if value in TAU_H_SCOPES else f"must be one of {', '.join(TAU_H_SCOPES)}"


def _check_decision_policy(value: Any) -> str | None:
    return None if value in DECISION_POLICIES else f"must be one of {', '.join(DECISION_POLICIES)}"


def _check_inert_steps(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be an int >= 0 (0: never warn)"


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "tau_p": _check_tau_p,
    "tau_h": _check_tau_h,
    "tau_h_quantile": _check_tau_h_quantile,
    "tau_h_population": _check_population,
    "tau_h_max": _check_tau_h_max,
    "tau_h_scope": _check_scope,
    "decision_policy": _check_decision_policy,
    "inert_warning_steps": _check_inert_steps,
}


@dataclass(frozen=True)
class S2TSettings:
    """STAPO's spurious-token thresholds (see the module docstring); validated on construction."""

    tau_p: float = 0.002
    tau_h: float | None = None
    tau_h_quantile: float = 0.75
    tau_h_population: str = "candidates"
    tau_h_max: float = math.inf
    tau_h_scope: str = "mini_batch"
    decision_policy: str = "current"
    inert_warning_steps: int = 20

    def __post_init__(self) -> None:
        errors = [f"{name} {msg}, got {getattr(self, name)!r}"
                  for name, msg in s2t_errors(asdict(self), none_means_default=False).items()]
        if errors:
            raise ValueError("; ".join(errors))
        for name in ("tau_p", "tau_h_quantile", "tau_h_max") + (("tau_h",) if self.tau_h is not None else ()):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def resolve(cls, values: Mapping[str, Any] | None = None, base: S2TSettings | None = None,
                **kwargs: Any) -> S2TSettings:
        """Settings from `values` / `kwargs` (None or missing = `base`'s value, or the default).

        `tau_h` is special: None means "use the quantile", so a None there keeps `base`'s tau_h too.
        Unknown names raise `ValueError`.
        """
        given = {**(values or {}), **kwargs}
        unknown = set(given) - set(S2T_FIELDS)
        if unknown:
            raise ValueError(f"unknown S2T setting(s) {sorted(unknown)}; known: {', '.join(S2T_FIELDS)}")
        start = asdict(base if base is not None else cls())
        start.update({k: v for k, v in given.items() if v is not None})
        return cls(**start)

    @property
    def threshold_reading(self) -> str:
        """How tau_h is obtained, in words (for logs and model cards)."""
        if self.tau_h is not None:
            return f"H < {self.tau_h:g} nats"
        cap = f", at most {self.tau_h_max:.3g} nats" if math.isfinite(self.tau_h_max) else ""
        scope = self.tau_h_scope.replace("_", "-")
        source = "" if self.decision_policy == "current" else f" (p, H of the {self.decision_policy} policy)"
        return f"H < q{self.tau_h_quantile:g} of {self.tau_h_population} entropies per {scope}{cap}{source}"


S2T_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(S2TSettings))
S2T_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(S2TSettings)}


def s2t_field_error(name: str, value: Any) -> str | None:
    """The problem with `value` for S2T field `name` ("must be ..."), or None when it is valid."""
    return _CHECKS[name](value)


def s2t_errors(values: Mapping[str, Any], none_means_default: bool = True) -> dict[str, str]:
    """{field: problem} for every S2T field in `values` whose value is invalid. With
    `none_means_default`, None stands for the default and is valid everywhere (in config files);
    otherwise only tau_h may be None (it means: use the quantile)."""
    return {
        name: msg
        for name, value in values.items()
        if name in _CHECKS and not (value is None and none_means_default)
        and (msg := s2t_field_error(name, value)) is not None
    }


# Named readings of the S2T rule. "paper": the defaults. "former": what stapo shipped before it
# followed the paper's full text (taken from a secondary write-up).
S2T_READINGS: dict[str, S2TSettings] = {
    "paper": S2TSettings(),
    "former": S2TSettings(tau_p=0.01, tau_h_quantile=0.05, tau_h_max=math.log(2.0)),
}

