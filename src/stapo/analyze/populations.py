"""The three readings of "τ_h = the q-quantile of the token entropies", side by side.

For each population the quantile is taken over (`stapo.core.TAU_H_POPULATIONS`: valid, low_prob,
candidates) and each q, the S2T decision of `stapo.core.s2t_decision` on the batch gives:

    threshold             τ_h in nats (capped at `tau_h_max` when given)
    threshold_percentile  where τ_h falls among all valid entropies (% of valid tokens with H < τ_h):
                          the paper's premise is that silenced tokens sit at *confident* positions, so
                          a reading whose τ_h lands above the batch median no longer means "low entropy"
    masked, masked_frac   the silenced tokens and their fraction of the valid tokens
    grad_share            Σ_M g / Σ g with g = ‖∇_z log π(a)‖² = 1 − 2p + Σπ² (core.grad_norm_proxy)
    grad_share_weighted   the same with A² g (what the loss sees)
    silenced_entropy_mean / _max   the entropies of the silenced tokens
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from stapo.core import TAU_H_POPULATIONS, S2TSettings, s2t_decision

POPULATION_QUANTILES = (0.01, 0.05, 0.1, 0.2)


@dataclass
class PopulationRow:
    population: str
    quantile: float
    population_size: int
    threshold: float | None  # None: an empty population (nothing silenced)
    threshold_percentile: float | None
    masked: int
    masked_frac: float
    grad_share: float
    grad_share_weighted: float
    silenced_entropy_mean: float | None
    silenced_entropy_max: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def population_table(batch, tau_p: float, quantiles=POPULATION_QUANTILES,
                     tau_h_max: float = float("inf")) -> list[PopulationRow]:
    """One `PopulationRow` per (population, q) on a `stapo.analyze.tokens.TokenBatch`; each quantile
    τ_h is capped at `tau_h_max` (the S2T setting; inf: uncapped)."""
    valid_ent = batch.flat(batch.entropy).double()
    n_valid = valid_ent.numel()
    rows = []
    for population in TAU_H_POPULATIONS:
        for q in quantiles:
            settings = S2TSettings(tau_p=tau_p, tau_h_quantile=q, tau_h_population=population, tau_h_max=tau_h_max)
            d = s2t_decision(batch.logprobs, batch.entropy, batch.advantages, batch.valid, settings)
            size = {"valid": d.n_valid, "low_prob": d.n_low_prob, "candidates": d.n_candidates}[population]
            mask = batch.flat(d.spurious)
            threshold = float(d.threshold)
            empty = threshold == float("-inf")
            share, weighted = batch.grad_shares(mask)
            silenced = valid_ent[mask]
            rows.append(PopulationRow(
                population=population,
                quantile=q,
                population_size=int(size),
                threshold=None if empty else threshold,
                threshold_percentile=None if empty else 100.0 * float((valid_ent < threshold).sum()) / max(n_valid, 1),
                masked=int(mask.sum()),
                masked_frac=float(mask.sum()) / max(n_valid, 1),
                grad_share=share,
                grad_share_weighted=weighted,
                silenced_entropy_mean=float(silenced.mean()) if silenced.numel() else None,
                silenced_entropy_max=float(silenced.max()) if silenced.numel() else None,
            ))
    return rows


def format_population_table(rows: list[PopulationRow]) -> list[str]:
    """The table as aligned text lines (printed summary, markdown-compatible)."""
    head = ("| population | q | size (tokens) | τ_h (nats) | τ_h pctl (%) | silenced (tokens) | silenced (% of tokens) "
            "| grad-norm² share (%) | A²·grad-norm² share (%) | silenced H mean / max (nats) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        thr = "empty" if r.threshold is None else f"{r.threshold:.4g}"
        pct = "—" if r.threshold_percentile is None else f"{r.threshold_percentile:.1f}"
        sil = ("—" if r.silenced_entropy_mean is None
               else f"{r.silenced_entropy_mean:.3g} / {r.silenced_entropy_max:.3g}")
        lines.append(
            f"| {r.population} | {r.quantile:g} | {r.population_size} | {thr} | {pct} | {r.masked} | "
            f"{100 * r.masked_frac:.4f} | {100 * r.grad_share:.3f} | {100 * r.grad_share_weighted:.3f} | {sil} |"
        )
    return lines


def masked_fraction_bound(tau_h: float, quantile: float) -> float:
    """Upper bound on the masked fraction of the `valid` reading: q · h_b⁻¹(τ_h), where h_b⁻¹ is the
    inverse of the binary entropy (nats) on [0, ½] (a token of probability p sits where H ≥ h_b(p))."""
    if tau_h <= 0:
        return 0.0
    if tau_h >= torch.log(torch.tensor(2.0)).item():
        return quantile * 0.5
    lo, hi = 0.0, 0.5
    for _ in range(80):  # bisection: h_b is increasing on [0, ½]
        mid = (lo + hi) / 2
        h = -(mid * torch.log(torch.tensor(mid)) + (1 - mid) * torch.log1p(torch.tensor(-mid))).item()
        lo, hi = (mid, hi) if h < tau_h else (lo, mid)
    return quantile * hi
