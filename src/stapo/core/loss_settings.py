"""The loss settings every engine shares: one rule each, written once (as `stapo.core.settings` does for S2T).

    clip_low              PPO's lower clip: r is clipped below at 1 - clip_low              >= 0 (inf: no clip)
    clip_high             PPO's upper clip: r is clipped above at 1 + clip_high             >= 0 (inf: no clip)
    clip_ratio_c          dual clip for A < 0: a token's term is at most -A * clip_ratio_c   > 1 (None: no dual clip)
    top_entropy_quantile  20-Entropy's rho: the fraction of the highest-entropy tokens that keep a gradient
                                                                                         (0, 1]

Their defaults are the method presets' (`stapo.core.presets`). The rules are the core's: a clip epsilon
of 0 clips at r = 1 on that side, an infinite one clips nothing, an infinite dual-clip bound is no dual
clip -- all well defined, so all accepted. NaN, booleans and non-numbers are refused, and so is a rho
of 0, which would keep no token at all.

Each engine spells the clip range its own way (TRL: `epsilon`, `epsilon_high`; verl: `actor.clip_ratio_low`,
`actor.clip_ratio_high`, falling back to `actor.clip_ratio`). `check_<setting>(value, name=...)` raises one
`ValueError` "<name> must be ..., got <value>" in the caller's spelling; `loss_setting_error` returns the
problem ("must be ...") for a config that lists every bad field at once. Callers: the core's losses and
filters, `stapo train`'s run config (`stapo.config`), the TRL `STAPOConfig` and the verl config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "LOSS_SETTING_FIELDS",
    "check_clip_high",
    "check_clip_low",
    "check_clip_ratio_c",
    "check_top_entropy_quantile",
    "loss_setting_error",
]


def _real(value: Any) -> bool:
    """An int or float that is not NaN (inf allowed) and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_clip_epsilon(value: Any) -> str | None:
    return None if _real(value) and value >= 0 else "must be a number >= 0"


def _check_clip_ratio_c(value: Any) -> str | None:
    return None if _real(value) and value > 1 else "must be a number > 1 (the dual-clip bound for A < 0)"


def _check_top_entropy_quantile(value: Any) -> str | None:
    ok = _real(value) and 0 < value <= 1
    return None if ok else "must be a number in (0, 1] (the fraction of tokens that keep a gradient; 0 keeps none)"


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "clip_low": _check_clip_epsilon,
    "clip_high": _check_clip_epsilon,
    "clip_ratio_c": _check_clip_ratio_c,
    "top_entropy_quantile": _check_top_entropy_quantile,
}
LOSS_SETTING_FIELDS: tuple[str, ...] = tuple(_CHECKS)


def loss_setting_error(setting: str, value: Any) -> str | None:
    """The problem with `value` for the shared loss setting `setting` (one of `LOSS_SETTING_FIELDS`, in the
    core's spelling) as "must be ...", or None when it is valid. None is not a value here: what None means
    (the preset's value, no dual clip) is the caller's to decide."""
    return _CHECKS[setting](value)


def _checked(setting: str, value: Any, name: str) -> float:
    problem = loss_setting_error(setting, value)
    if problem is not None:
        raise ValueError(f"{name} {problem}, got {value!r}")
    return float(value)


def check_clip_low(value: Any, name: str = "clip_low") -> float:
    """`value` as a float, or `ValueError` "<name> must be ..." (`name`: the caller's spelling, e.g. epsilon)."""
    return _checked("clip_low", value, name)


def check_clip_high(value: Any, name: str = "clip_high") -> float:
    """`value` as a float, or `ValueError` "<name> must be ..." (`name`: e.g. epsilon_high)."""
    return _checked("clip_high", value, name)


def check_clip_ratio_c(value: Any, name: str = "clip_ratio_c") -> float | None:
    """`value` as a float (None stays None: no dual clip), or `ValueError` "<name> must be ..."."""
    return None if value is None else _checked("clip_ratio_c", value, name)


def check_top_entropy_quantile(value: Any, name: str = "top_entropy_quantile") -> float:
    """`value` as a float, or `ValueError` "<name> must be ..." (`name`: e.g. top_quantile)."""
    return _checked("top_entropy_quantile", value, name)
