"""Method presets: the paper's comparison is the same config with a different `method`.

Each preset fixes the advantage scaling, the clip range, the loss aggregation and the token
filter; everything else (lr, group size, lengths) is the run's config. Sources: METHOD.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

TOKEN_FILTERS = ("none", "s2t", "high_entropy")


@dataclass(frozen=True)
class MethodPreset:
    name: str
    advantage_scale: str  # group_advantages(scale=...)
    clip_low: float
    clip_high: float
    agg: str  # aggregate(agg=...)
    token_filter: str  # "none" | "s2t" (STAPO) | "high_entropy" (20-Entropy)
    top_entropy_quantile: float | None = None  # 20-Entropy's rho
    tau_p: float | None = None  # STAPO
    tau_h: float | None = None  # STAPO, absolute threshold in nats (None: use the quantile)
    tau_h_quantile: float | None = None  # STAPO
    description: str = ""

    def with_overrides(self, **kwargs) -> "MethodPreset":
        return replace(self, **{k: v for k, v in kwargs.items() if v is not None})


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
            "justrl", "group", 0.2, 0.28, "token-mean", "none",
            description="JustRL: plain GRPO, binary reward, clip [0.8, 1.28], no KL, no entropy bonus.",
        ),
        MethodPreset(
            "stapo", "group", 0.2, 0.28, "token-mean", "s2t",
            tau_p=0.01, tau_h=None, tau_h_quantile=0.05,
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
