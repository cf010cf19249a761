"""A guard against a silently inert S2T mask: STAPO that silences nothing trains exactly like JustRL.

Engines call `InertS2TMonitor.update` once per optimizer step with that step's global counts; it
returns one warning line when S2T has silenced no token for `inert_warning_steps` steps in a row
(again only after a step that silenced something), else None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stapo.core.settings import S2TSettings

PAPER_MASKED_FRACTION = 1e-4  # the paper reports ≈ 0.01% of tokens silenced


@dataclass
class InertS2TMonitor:
    settings: S2TSettings
    streak: int = 0
    warned: bool = False

    def update(self, n_spurious: float, n_valid: float, n_low_prob: float, n_candidates: float,
               threshold: float, suggest_tau_h: Callable[[], float | None]) -> str | None:
        """This step's counts (summed over processes) -> a warning line, or None.

        `threshold`: the τ_h in nats the step used; `suggest_tau_h()` (called only to warn): the absolute
        τ_h that would have silenced ≈ `PAPER_MASKED_FRACTION` of the step's valid tokens (None: too few
        candidates)."""
        limit = self.settings.inert_warning_steps
        if n_spurious > 0:
            self.streak, self.warned = 0, False
            return None
        self.streak += 1
        if limit == 0 or self.warned or self.streak < limit:
            return None
        self.warned = True
        s = self.settings
        suggested_tau_h = suggest_tau_h()
        would = (f"an absolute tau_h of {suggested_tau_h:.4g} nats would have silenced "
                 f"~{100 * PAPER_MASKED_FRACTION:g}%"
                 if suggested_tau_h is not None else
                 f"no tau_h reaches ~{100 * PAPER_MASKED_FRACTION:g}% at tau_p = {s.tau_p:g} (too few candidates)")
        return (
            f"S2T has silenced no token for {self.streak} optimizer steps in a row (tau_p = {s.tau_p:g}, "
            f"tau_h: {s.threshold_reading}"
            f"{'' if n_candidates == 0 and s.tau_h is None else f' = {threshold:.4g} nats'}); "
            f"last step: {int(n_valid)} valid tokens, "
            f"{int(n_low_prob)} with p < tau_p, {int(n_candidates)} candidates (A > 0); {would}. "
            "STAPO is training like JustRL: see tau_h_population in docs/analyze.md "
            "(inert_warning_steps = 0 turns this warning off)"
        )
