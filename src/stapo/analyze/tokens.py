"""Token-level diagnostics: which tokens S2T silences, how many, and how large their gradients are.

Everything is computed from a `stapo.data.rollouts.Rollouts` (captured by a trainer, or produced
by `stapo.analyze.collect` from a model) with the functions of `stapo.core`:

    S2T set        M_t = A > 0 ∧ p_t < τ_p ∧ H_t < τ_h              (core.s2t_mask)
    τ_h            absolute (nats) or a quantile of the valid tokens' entropies (core.entropy_quantile)
    grad proxy     g_t = ‖∇_z log π(a_t)‖² = 1 − 2p_t + Σπ²          (core.grad_norm_proxy)
    grad share     Σ_{t∈M} g_t / Σ_t g_t                           (share of the summed grad-norm²)
    weighted share Σ_{t∈M} A_t² g_t / Σ_t A_t² g_t                  (‖∇_z (A_t log π)‖², what the loss sees)
    entropy change ΔH_t/η = −A_t [p (log p + H) − Σπ² (log π + H)]  (core.entropy_change_first_order:
                   first order, each token's own update on its own position, per unit step on the
                   sampling-temperature logits; needs Σπ² log π, so only for rollouts scored from a model)
    ΔH shares      per group G: Σ_{t∈G} ΔH_t / Σ_t |ΔH_t| (signed: the groups' signed shares add up
                   to the net Σ ΔH / Σ |ΔH|) and Σ_{t∈G} |ΔH_t| / Σ_t |ΔH_t| (absolute)

The threshold sweep evaluates the same quantities on a grid of τ_p × τ_h, so a user can pick
thresholds that silence the paper's ~0.01% of tokens on their own model and data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from stapo.core import S2TSettings, entropy_change_first_order, s2t_decision, tau_h_for_fraction, token_fractions
from stapo.core.monitor import PAPER_MASKED_FRACTION
from stapo.data.rollouts import Rollouts

SWEEP_TAU_P = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)
SWEEP_TAU_H_QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.5)
SWEEP_TAU_H_ABSOLUTE = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
APPLIED = "applied"  # the sweep row of the applied tau_h (in nats)
POPULATION_WORDS = {"valid": "valid tokens", "low_prob": "tokens with p < tau_p",
                    "candidates": "candidates (A > 0, p < tau_p)"}


def thresholds_label(th: S2TSettings) -> str:
    return f"tau_p={th.tau_p:g}, tau_h: {th.threshold_reading}"


class TokenBatch:
    """A Rollouts as padded torch tensors [S, T], built once and shared by the analyses."""

    def __init__(self, rollouts: Rollouts, collision_logp=None):
        if rollouts.num_tokens == 0:
            raise ValueError("the rollouts hold no completion tokens: nothing to analyze")
        if collision_logp is not None and np.shape(collision_logp) != (rollouts.num_tokens,):
            raise ValueError(f"collision_logp must have one value per token ({rollouts.num_tokens}), "
                             f"got shape {np.shape(collision_logp)}")
        self.rollouts = rollouts
        pad = rollouts.padded()
        self.logprobs = pad["logprobs"]
        self.entropy = pad["entropy"]
        self.advantages = pad["advantages"]
        self.valid = pad["response_mask"]
        self.captured_s2t = pad["s2t"]
        lens = rollouts.lengths()
        rows = np.repeat(np.arange(rollouts.num_samples), lens)
        cols = np.arange(rollouts.num_tokens) - np.repeat(rollouts.offsets[:-1], lens)
        self._index = (torch.as_tensor(rows), torch.as_tensor(cols))
        self.grad_proxy = torch.as_tensor(rollouts.grad_proxy, dtype=torch.float64)  # flat [N]
        self.adv_flat = torch.as_tensor(np.repeat(rollouts.advantage, lens), dtype=torch.float64)
        # First-order entropy change of each token's own update, per unit step (None without Σπ² log π).
        self.delta_h = None
        if collision_logp is not None:
            self.delta_h = entropy_change_first_order(
                torch.as_tensor(rollouts.logprob), torch.as_tensor(rollouts.entropy),
                torch.as_tensor(rollouts.collision), torch.as_tensor(collision_logp), self.adv_flat)

    def flat(self, padded: torch.Tensor) -> torch.Tensor:
        """[S, T] -> the [N] values of the valid tokens in the Rollouts' flat order."""
        return padded[self._index]

    def decision(self, th: S2TSettings):
        """`core.s2t_decision` on the padded batch: nothing re-implemented."""
        return s2t_decision(self.logprobs, self.entropy, self.advantages, self.valid, th)

    def tau_h_value(self, th: S2TSettings) -> float:
        """τ_h in nats (-inf: an empty population, nothing silenced)."""
        return float(self.decision(th).threshold)

    def mask(self, th: S2TSettings) -> torch.Tensor:
        """The S2T set, flat [N] bool."""
        return self.flat(self.decision(th).spurious)

    def grad_shares(self, mask_flat: torch.Tensor) -> tuple[float, float]:
        g = self.grad_proxy
        gw = g * self.adv_flat.square()
        share = float(g[mask_flat].sum() / g.sum()) if float(g.sum()) > 0 else 0.0
        wshare = float(gw[mask_flat].sum() / gw.sum()) if float(gw.sum()) > 0 else 0.0
        return share, wshare

    def entropy_change_groups(self, mask_flat: torch.Tensor) -> dict | None:
        """Per group (all, s2t, other, pos_adv, neg_adv): count, mean ΔH/η, Σ ΔH/η, the signed share
        Σ_G ΔH / Σ_all |ΔH| and the absolute share Σ_G |ΔH| / Σ_all |ΔH|. None without ΔH."""
        if self.delta_h is None:
            return None
        dh = self.delta_h
        total_abs = float(dh.abs().sum())
        groups = {"all": torch.ones_like(mask_flat), "s2t": mask_flat, "other": ~mask_flat,
                  "pos_adv": self.adv_flat > 0, "neg_adv": self.adv_flat < 0}
        out = {}
        for name, g in groups.items():
            v = dh[g]
            n = int(v.numel())
            out[name] = {
                "count": n,
                "mean": float(v.mean()) if n else float("nan"),
                "sum": float(v.sum()),
                "share_signed": float(v.sum()) / total_abs if total_abs > 0 else 0.0,
                "share_abs": float(v.abs().sum()) / total_abs if total_abs > 0 else 0.0,
            }
        return out


@dataclass
class TokenSummary:
    thresholds: str
    tau_p: float
    tau_h: float
    tau_h_quantile: float | None
    tau_h_population: str | None
    samples: int
    tokens: int
    mean_length: float
    tokens_pos_adv: int
    tokens_neg_adv: int
    tokens_zero_adv: int
    reward_mean: float
    entropy_mean: float
    entropy_q01: float
    entropy_q05: float
    entropy_median: float
    prob_min: float
    count_low_prob: int
    frac_low_prob: float
    count_low_entropy: int
    frac_low_entropy: float
    count_low_prob_low_entropy: int  # any advantage sign
    count_s2t: int
    frac_s2t: float
    grad_share_s2t: float
    grad_share_s2t_adv_weighted: float
    grad_proxy_mean: float
    grad_proxy_mean_s2t: float
    grad_proxy_mean_other: float
    captured_s2t_count: int | None = None  # flags recorded by the trainer (captured rollouts only)
    tau_h_for_paper_fraction: float | None = None  # absolute τ_h giving ≥ 0.01 % at this τ_p
    paper_fraction_reachable: bool = False
    max_frac_at_tau_p: float = 0.0  # masked fraction with τ_h = ∞ (A > 0 ∧ p < τ_p)
    entropy_change: dict | None = None  # TokenBatch.entropy_change_groups (None: no Σπ² log π)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(rollouts: Rollouts | TokenBatch, thresholds: S2TSettings | None = None,
              captured: bool = False) -> TokenSummary:
    """Summary statistics of the tokens and of the S2T set at `thresholds` (None: the paper's rule)."""
    thresholds = S2TSettings() if thresholds is None else thresholds
    tb = rollouts if isinstance(rollouts, TokenBatch) else TokenBatch(rollouts)
    ro = tb.rollouts
    decision = tb.decision(thresholds)  # one S2T decision: threshold, mask and candidates
    tau_h = thresholds.tau_h if thresholds.tau_h is not None else float(decision.threshold)
    mask = tb.flat(decision.spurious)
    padded_mask = torch.zeros_like(tb.valid)
    padded_mask[tb._index] = mask
    fr = token_fractions(tb.logprobs, tb.entropy, tb.valid, thresholds.tau_p, tau_h, spurious=padded_mask)
    lp = torch.as_tensor(ro.logprob, dtype=torch.float64)
    ent = torch.as_tensor(ro.entropy, dtype=torch.float64)
    adv = tb.adv_flat
    g = tb.grad_proxy
    low_p, low_h = lp.exp() < thresholds.tau_p, ent < tau_h
    share, wshare = tb.grad_shares(mask)
    q = torch.quantile(ent.float(), torch.tensor([0.01, 0.05, 0.5])).tolist()
    candidates = decision.candidates
    target_tau_h = tau_h_for_fraction(tb.entropy, candidates, ro.num_tokens, PAPER_MASKED_FRACTION)
    reachable, max_frac = target_tau_h is not None, float(candidates.sum()) / ro.num_tokens
    rewards = ro.reward[np.isfinite(ro.reward)]
    return TokenSummary(
        thresholds=thresholds_label(thresholds),
        tau_p=thresholds.tau_p,
        tau_h=tau_h,
        tau_h_quantile=None if thresholds.tau_h is not None else thresholds.tau_h_quantile,
        tau_h_population=None if thresholds.tau_h is not None else thresholds.tau_h_population,
        samples=ro.num_samples,
        tokens=ro.num_tokens,
        mean_length=ro.num_tokens / max(ro.num_samples, 1),
        tokens_pos_adv=int((adv > 0).sum()),
        tokens_neg_adv=int((adv < 0).sum()),
        tokens_zero_adv=int((adv == 0).sum()),
        reward_mean=float(rewards.mean()) if rewards.size else float("nan"),
        entropy_mean=float(ent.mean()),
        entropy_q01=q[0],
        entropy_q05=q[1],
        entropy_median=q[2],
        prob_min=float(lp.min().exp()),
        count_low_prob=int(low_p.sum()),
        frac_low_prob=fr["frac_low_prob"],
        count_low_entropy=int(low_h.sum()),
        frac_low_entropy=fr["frac_low_entropy"],
        count_low_prob_low_entropy=int((low_p & low_h).sum()),
        count_s2t=int(mask.sum()),
        frac_s2t=fr["s2t_frac"],
        grad_share_s2t=share,
        grad_share_s2t_adv_weighted=wshare,
        grad_proxy_mean=float(g.mean()),
        grad_proxy_mean_s2t=float(g[mask].mean()) if bool(mask.any()) else float("nan"),
        grad_proxy_mean_other=float(g[~mask].mean()) if bool((~mask).any()) else float("nan"),
        captured_s2t_count=int(ro.s2t.sum()) if captured else None,
        tau_h_for_paper_fraction=target_tau_h,
        paper_fraction_reachable=reachable,
        max_frac_at_tau_p=max_frac,
        entropy_change=tb.entropy_change_groups(mask),
    )


@dataclass
class SweepCell:
    tau_p: float
    tau_h_label: str  # "q0.05" or "0.1"
    tau_h: float  # the value in nats
    count: int
    frac: float
    grad_share: float
    grad_share_adv_weighted: float


@dataclass
class Sweep:
    tau_p: tuple[float, ...]
    tau_h_labels: list[str]
    cells: list[SweepCell]  # row-major: tau_h rows x tau_p columns
    tokens: int

    def cell(self, tau_h_label: str, tau_p: float) -> SweepCell:
        for c in self.cells:
            if c.tau_h_label == tau_h_label and c.tau_p == tau_p:
                return c
        raise KeyError((tau_h_label, tau_p))

    def as_dict(self) -> dict:
        return {"tau_p": list(self.tau_p), "tau_h_labels": self.tau_h_labels, "tokens": self.tokens,
                "cells": [asdict(c) for c in self.cells]}


def threshold_sweep(
    rollouts: Rollouts | TokenBatch,
    tau_p: tuple[float, ...] = SWEEP_TAU_P,
    tau_h_quantiles: tuple[float, ...] = SWEEP_TAU_H_QUANTILES,
    tau_h_absolute: tuple[float, ...] = SWEEP_TAU_H_ABSOLUTE,
    applied: S2TSettings | None = None,
) -> Sweep:
    """Masked fraction and gradient share of the S2T set on a grid of thresholds. `applied`: the
    settings in use get a column (their τ_p, when the grid lacks it) and a last row, `APPLIED`, at their
    τ_h in nats (a quantile τ_h resolved once, on these tokens at the applied τ_p)."""
    tb = rollouts if isinstance(rollouts, TokenBatch) else TokenBatch(rollouts)
    if applied is not None and applied.tau_p not in tau_p:
        tau_p = tuple(sorted((*tau_p, applied.tau_p)))
    # quantile rows: of all valid tokens' entropies, uncapped (the three readings have their own table)
    rows = [(f"q{q:g}", S2TSettings(tau_h_quantile=q, tau_h_population="valid", tau_h_max=math.inf))
            for q in tau_h_quantiles]
    rows += [(f"{h:g}", S2TSettings(tau_h=h)) for h in tau_h_absolute]
    if applied is not None:
        rows.append((APPLIED, applied))
    n = tb.rollouts.num_tokens
    cells = []
    for label, base in rows:
        tau_h = tb.tau_h_value(base)
        for p in tau_p:
            # The quantile is resolved once per row, so every τ_p column uses the same τ_h.
            m = tb.mask(S2TSettings(tau_p=p, tau_h=max(tau_h, 0.0)))  # -inf (no valid token): nothing
            share, wshare = tb.grad_shares(m)
            cnt = int(m.sum())
            cells.append(SweepCell(p, label, tau_h, cnt, cnt / n, share, wshare))
    return Sweep(tuple(tau_p), [r[0] for r in rows], cells, n)


# ------------------------------------------------------------------------------------ text output


def _pct(x: float) -> str:
    if x != x:
        return "n/a"
    if x == 0:
        return "0"
    return f"{100 * x:.4f}%" if x < 1e-3 else f"{100 * x:.3f}%" if x < 0.1 else f"{100 * x:.1f}%"


def _sci(x: float) -> str:
    return "n/a" if x != x else f"{x:+.3e}"


def _signed_pct(x: float) -> str:
    return ("-" if x < 0 else "+") + _pct(abs(x)) if x == x else "n/a"


def _num(x: float) -> str:
    return "n/a (empty set)" if x != x else f"{x:.4f}"


def format_summary(s: TokenSummary) -> str:
    lines = [
        f"samples {s.samples}, completion tokens {s.tokens} (mean length {s.mean_length:.1f}), "
        f"reward mean {s.reward_mean:.3f}",
        f"tokens with A>0: {s.tokens_pos_adv}   A<0: {s.tokens_neg_adv}   A=0: {s.tokens_zero_adv}",
        f"entropy mean {s.entropy_mean:.4f} nats; quantiles 1% {s.entropy_q01:.3g}, 5% {s.entropy_q05:.3g}, "
        f"50% {s.entropy_median:.3g}; smallest p {s.prob_min:.3g}",
        f"thresholds: tau_p = {s.tau_p:g}, tau_h = {s.tau_h:.4g} nats"
        + (f" (the {s.tau_h_quantile:g} quantile)" if s.tau_h_quantile is not None else " (absolute)"),
        f"  p < tau_p:           {s.count_low_prob:>8}  ({_pct(s.frac_low_prob)})",
        f"  H < tau_h:           {s.count_low_entropy:>8}  ({_pct(s.frac_low_entropy)})",
        f"  p < tau_p & H < tau_h: {s.count_low_prob_low_entropy:>6}  (any advantage sign)",
        f"  S2T set (A>0 too):   {s.count_s2t:>8}  ({_pct(s.frac_s2t)} of tokens)",
        f"grad-norm^2 proxy 1-2p+sum(pi^2): mean {s.grad_proxy_mean:.4f}; S2T mean {_num(s.grad_proxy_mean_s2t)}, "
        f"others {_num(s.grad_proxy_mean_other)}",
        f"share of total grad-norm^2 carried by the S2T set: {_pct(s.grad_share_s2t)} "
        f"(advantage-weighted A^2*proxy: {_pct(s.grad_share_s2t_adv_weighted)})",
    ]
    if s.entropy_change is None:
        lines.append("entropy change dH: n/a (needs sum(pi^2 log pi), computed only when scoring with --model)")
    else:
        lines.append("first-order entropy change of each token's own update, dH/eta = -A[p(log p+H) - "
                     "sum pi^2(log pi+H)];")
        lines.append("  group      tokens   mean dH/eta   signed share   |dH| share   (shares of sum |dH|)")
        for name, g in s.entropy_change.items():
            lines.append(f"  {name:<9} {g['count']:>7}   {_sci(g['mean']):>11}   {_signed_pct(g['share_signed']):>12}"
                         f"   {_pct(g['share_abs']):>10}")
    if s.captured_s2t_count is not None:
        lines.append(f"S2T flags recorded by the trainer: {s.captured_s2t_count}")
    if s.paper_fraction_reachable:
        lines.append(
            f"calibration: at tau_p = {s.tau_p:g}, an absolute tau_h = {s.tau_h_for_paper_fraction:.4g} nats "
            f"masks >= 0.01% of tokens (the paper's fraction)"
        )
    else:
        lines.append(
            f"calibration: at tau_p = {s.tau_p:g} no tau_h reaches 0.01% of tokens "
            f"(at most {_pct(s.max_frac_at_tau_p)} have A>0 and p<tau_p); raise tau_p or analyze more tokens"
        )
    return "\n".join(lines)


def sweep_row_name(sw: Sweep, label: str) -> str:
    """A sweep row's name: "q0.05 (0.0123 nats)", "0.1 nats" or "applied (0.743 nats)"."""
    tau_h = sw.cell(label, sw.tau_p[0]).tau_h
    if label.startswith("q"):
        return f"quantile {label[1:]} ({tau_h:.4g} nats)"
    if label == APPLIED:
        return f"applied ({tau_h:.4g} nats)" if tau_h > float("-inf") else "applied (no candidates)"
    return f"{label} nats"


def format_console(s: TokenSummary, sweep: Sweep, populations, truncated: tuple[int, int] | None = None) -> str:
    """What `stapo analyze tokens` prints: a short summary, the τ_h readings side by side and the sweep
    of the silenced fraction, each with its unit and the applied thresholds (the full detail is in the
    JSON summary and the HTML report). `populations`: `stapo.analyze.populations.PopulationRow`s;
    `truncated`: (completions cut at the token limit, the limit) when known."""
    cut = ""
    if truncated is not None:
        n_cut, limit = truncated
        cut = (f"; {n_cut} of {s.samples} cut at the {limit}-token limit" if n_cut
               else f"; none cut at the {limit}-token limit")
    population = POPULATION_WORDS.get(s.tau_h_population or "", s.tau_h_population)
    reading = (f"the {s.tau_h_quantile:g} quantile of the entropies of the {population}"
               if s.tau_h_quantile is not None else "absolute")
    lines = [
        f"{s.samples} completions, {s.tokens} tokens (mean {s.mean_length:.1f} per completion{cut}); "
        f"reward mean {s.reward_mean:.3f}",
        f"entropy: mean {s.entropy_mean:.3g} nats, median {s.entropy_median:.3g} nats, 5% quantile "
        f"{s.entropy_q05:.3g} nats; {_pct(s.frac_low_prob)} of tokens have p < tau_p",
        f"S2T applied: tau_p = {s.tau_p:g}, tau_h = {s.tau_h:.4g} nats ({reading})",
        f"  silenced: {s.count_s2t} tokens = {_pct(s.frac_s2t)} of tokens, carrying {_pct(s.grad_share_s2t)} of the "
        f"total grad-norm^2 ({_pct(s.grad_share_s2t_adv_weighted)} A^2-weighted)",
    ]
    if s.captured_s2t_count is not None:
        lines.append(f"S2T tokens flagged by the trainer during training: {s.captured_s2t_count}")
    if s.entropy_change is not None:
        g = s.entropy_change
        lines.append("entropy change of each token's own update (signed share of sum |dH|): "
                     f"S2T {_signed_pct(g['s2t']['share_signed'])}, "
                     f"other tokens {_signed_pct(g['other']['share_signed'])}")
    if s.paper_fraction_reachable:
        lines.append(f"calibration: tau_h = {s.tau_h_for_paper_fraction:.4g} nats (absolute) silences >= 0.01% of "
                     f"tokens at tau_p = {s.tau_p:g} (the paper's fraction)")
    else:
        lines.append(f"calibration: no tau_h silences 0.01% of tokens at tau_p = {s.tau_p:g} (at most "
                     f"{_pct(s.max_frac_at_tau_p)} have A > 0 and p < tau_p)")

    quantiles = list(dict.fromkeys(r.quantile for r in populations))
    head = ["population"] + [f"q = {q:g}" for q in quantiles]
    body = []
    for population in dict.fromkeys(r.population for r in populations):
        by_q = {r.quantile: r for r in populations if r.population == population}
        body.append([population] + [
            "empty" if by_q[q].threshold is None else f"{by_q[q].threshold:.3g} nats, {_pct(by_q[q].masked_frac)}"
            for q in quantiles])
    lines += ["", f"tau_h readings at tau_p = {s.tau_p:g}: tau_h = the q-quantile of a population's entropies, "
              "% of tokens silenced", _table(head, body),
              f"applied     {s.tau_h:.4g} nats, {_pct(s.frac_s2t)} ({reading})"]
    lines += ["", "threshold sweep: % of tokens silenced (count); rows tau_h, columns tau_p; [ ] = applied",
              format_sweep(sweep, "frac", applied_tau_p=s.tau_p)]
    return "\n".join(lines)


def _table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def format_sweep(sw: Sweep, value: str = "frac", applied_tau_p: float | None = None) -> str:
    """A text table: rows τ_h (quantiles of all tokens' entropies, absolute nats, the applied τ_h), columns
    τ_p; cells in % of tokens (the count in parentheses for `frac`). `applied_tau_p`: the applied cell
    (row `APPLIED`, that column) is bracketed."""
    head = ["tau_h \\ tau_p"] + [f"{p:g}" for p in sw.tau_p]
    body = []
    for label in sw.tau_h_labels:
        cells = [sw.cell(label, p) for p in sw.tau_p]
        if value == "frac":
            texts = [f"{_pct(c.frac)} ({c.count})" for c in cells]
        else:
            texts = [_pct(getattr(c, value)) for c in cells]
        if label == APPLIED and applied_tau_p is not None:
            texts = [f"[{t}]" if c.tau_p == applied_tau_p else t for t, c in zip(texts, cells)]
        body.append([sweep_row_name(sw, label)] + texts)
    return _table(head, body)
