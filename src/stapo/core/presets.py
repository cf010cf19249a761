"""Method presets: the paper's comparison is the same config with a different `method`.

Each preset fixes the advantage scaling, the clip range, the loss aggregation and the token
filter; everything else (lr, group size, lengths) is the run's config. Sources: each method's paper or
public script (see the descriptions).
"""

from __future__ import annotations

from dataclasses import dataclass

from stapo.core.filters import TOKEN_FILTERS, TokenFilterSpec
from stapo.core.settings import S2TSettings


@dataclass(frozen=True)
class MethodPreset:
    name: str
    advantage_scale: str  # group_advantages(scale=...)
    clip_low: float
    clip_high: float
    agg: str  # aggregate(agg=...)
    token_filter: str  # a name in stapo.core.TOKEN_FILTERS: "none" | "s2t" (STAPO) | "high_entropy" (20-Entropy)
    top_entropy_quantile: float | None = None  # 20-Entropy's rho
    clip_ratio_c: float | None = None  # dual-clip bound for A < 0 (None: no dual clip)
    s2t: S2TSettings | None = None  # STAPO's thresholds; None: S2T is not applied (only measured)
    description: str = ""

    def __post_init__(self) -> None:
        if self.token_filter not in TOKEN_FILTERS:
            raise ValueError(f"token_filter must be one of {', '.join(TOKEN_FILTERS)}, got {self.token_filter!r}")

    @property
    def s2t_settings(self) -> S2TSettings:
        """The thresholds S2T applies (stapo) or only measures (every other method: the defaults)."""
        return self.s2t if self.s2t is not None else S2TSettings()

    @property
    def filter(self) -> TokenFilterSpec:
        """The token filter's registry entry: what it does (applies S2T, denominator), not its name."""
        return TOKEN_FILTERS[self.token_filter]


PRESETS: dict[str, MethodPreset] = {
    p.name: p
    for p in (
        MethodPreset(
            "grpo", "group", 0.2, 0.2, "token-mean", "none",
            description="GRPO with group-std advantages, symmetric clip 0.2, token-level aggregation.",
        ),
        MethodPreset(
            "dapo", "group", 0.2, 0.28, "token-mean", "none",
            description="DAPO's loss: clip-higher (0.2 / 0.28), token-level aggregation "
            "(dynamic sampling and overlong shaping are not part of the loss).",
        ),
        MethodPreset(
            "dr_grpo", "none", 0.2, 0.2, "seq-mean-token-sum-norm", "none",
            description="Dr.GRPO: no std scaling, token sums normalised by a constant horizon.",
        ),
        MethodPreset(
            "20-entropy", "group", 0.2, 0.28, "token-mean", "high_entropy", top_entropy_quantile=0.2,
            description="Beyond the 80/20 rule: gradient only for the top 20% highest-entropy tokens "
            "(DAPO clip-higher); the denominator keeps all valid tokens.",
        ),
        MethodPreset(
            "justrl", "group", 0.2, 0.28, "token-mean", "none", clip_ratio_c=10.0,
            description="JustRL (its public script): plain GRPO, binary reward, clip [0.8, 1.28], dual clip "
            "c = 10 for A < 0, no KL, no entropy bonus (its lr 1e-6, 10 warm-up steps and weight decay 0.1 "
            "are optimizer settings: the paper configs set them for every method).",
        ),
        MethodPreset(
            "stapo", "group", 0.2, 0.28, "token-mean", "s2t", clip_ratio_c=10.0, s2t=S2TSettings(),
            description="STAPO: JustRL's objective with spurious tokens (A > 0, p < tau_p, H < tau_h) "
            "silenced and the loss renormalised over the remaining valid tokens.",
        ),
    )
}


def get_preset(name: str) -> MethodPreset:
    """The preset called `name`; an unknown name raises `ValueError` listing the known ones."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(PRESETS)}") from None
