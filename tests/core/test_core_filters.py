"""The token-filter registry: each filter against an independent float64 reference, the three
tau_h populations on a hand-worked batch, and batches with no valid token."""

import math

import pytest
import torch

from stapo.core import (
    TOKEN_FILTERS,
    FilterParams,
    S2TSettings,
    apply_token_filter,
    get_token_filter,
    s2t_mask,
    stapo_loss,
)


def ref_quantile(values, q):
    v = sorted(values)
    if not v:
        return None
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ref_filter(name, lp, ent, adv, valid, s2t: S2TSettings, rho):
    """Plain Python, float64: (loss mask, spurious mask, threshold)."""
    B, T = lp.shape
    cells = [(i, t) for i in range(B) for t in range(T) if valid[i][t]]
    a = lambda i, t: float(adv[i] if adv.dim() == 1 else adv[i, t])  # noqa: E731
    low_prob = {(i, t) for i, t in cells if math.exp(float(lp[i, t])) < s2t.tau_p}
    cand = {(i, t) for i, t in low_prob if a(i, t) > 0}
    if s2t.tau_h is not None:
        thr = s2t.tau_h
    else:
        pop = {"valid": set(cells), "low_prob": low_prob, "candidates": cand}[s2t.tau_h_population]
        thr = ref_quantile([float(ent[c]) for c in pop], s2t.tau_h_quantile)
        thr = -math.inf if thr is None else min(thr, s2t.tau_h_max)
    spurious = torch.zeros(B, T, dtype=torch.bool)
    for c in cand:
        spurious[c] = float(ent[c]) < thr
    if name == "none":
        keep = valid.clone()
    elif name == "s2t":
        keep = valid & ~spurious
    else:
        t_rho = ref_quantile([float(ent[c]) for c in cells], 1 - rho)
        keep = torch.zeros(B, T, dtype=torch.bool)
        for c in cells:
            keep[c] = float(ent[c]) >= t_rho
    return keep, spurious, thr


def test_registry_holds_the_three_filters():
    assert set(TOKEN_FILTERS) == {"none", "s2t", "high_entropy"}
    with pytest.raises(ValueError, match="unknown token filter 'top'.*none.*s2t.*high_entropy"):
        get_token_filter("top")


@pytest.mark.parametrize("name", ["none", "s2t", "high_entropy"])
@pytest.mark.parametrize("population", ["valid", "low_prob", "candidates"])
@pytest.mark.parametrize("seed", range(4))
def test_filters_against_float64_reference(name, population, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 23
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 7
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(B, generator=g, dtype=torch.float64) if seed % 2 else torch.randn(B, T, generator=g,
                                                                                          dtype=torch.float64)
    valid = torch.rand(B, T, generator=g) > 0.25
    for s2t in (S2TSettings(tau_p=0.2, tau_h_quantile=0.3, tau_h_population=population),
                S2TSettings(tau_p=0.2, tau_h_quantile=0.6, tau_h_population=population, tau_h_max=math.inf),
                S2TSettings(tau_p=0.1, tau_h=0.7, tau_h_population=population),
                S2TSettings(tau_p=0.0)):
        got = apply_token_filter(name, lp.float(), ent.float(), adv.float(), valid, FilterParams(s2t, 0.3))
        keep, spurious, thr = ref_filter(name, lp, ent, adv, valid, s2t, 0.3)
        assert torch.equal(got.loss_mask, keep)
        assert torch.equal(got.s2t.spurious, spurious)
        assert float(got.s2t.threshold) == pytest.approx(thr, rel=1e-5, abs=1e-6)
        assert int(got.s2t.n_spurious) == int(spurious.sum())
        assert int(got.s2t.n_valid) == int(valid.sum())


def hand_batch():
    # row 0 (A = +1): p = .001 .005 .5 .002 .3 ; H = .05 .8 .01 1.5 .02
    # row 1 (A = -1): p = .004 .6 .003 (2 pads) ; H = .3 .04 2.0
    p = torch.tensor([[0.001, 0.005, 0.5, 0.002, 0.3], [0.004, 0.6, 0.003, 0.5, 0.5]])
    ent = torch.tensor([[0.05, 0.8, 0.01, 1.5, 0.02], [0.3, 0.04, 2.0, 9.0, 9.0]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return p.log(), ent, torch.tensor([1.0, -1.0]), valid


@pytest.mark.parametrize(
    "population, q, threshold, silenced",
    [
        # valid entropies .01 .02 .04 .05 .3 .8 1.5 2.0: q.25 -> .02 + .75 (.04 - .02) = .035: nothing
        ("valid", 0.25, 0.035, []),
        # low-prob (p < .01) entropies .05 .8 1.5 .3 2.0: q.25 -> .3: candidate (0, 0) with H .05
        ("low_prob", 0.25, 0.3, [(0, 0)]),
        # candidates (A > 0) entropies .05 .8 1.5: q.25 -> .05 + .5 (.8 - .05) = .425
        ("candidates", 0.25, 0.425, [(0, 0)]),
        # q.75: valid -> .8 + .25 (1.5 - .8) = .975; low_prob -> 1.5; candidates -> .8 + .5 (.7) = 1.15
        ("valid", 0.75, 0.975, [(0, 0), (0, 1)]),
        ("low_prob", 0.75, 1.5, [(0, 0), (0, 1)]),
        ("candidates", 0.75, 1.15, [(0, 0), (0, 1)]),
        ("candidates", 0.0, 0.05, []),  # the smallest candidate entropy is not below itself
    ],
)
def test_population_readings_hand_worked(population, q, threshold, silenced):
    lp, ent, adv, valid = hand_batch()
    s2t = S2TSettings(tau_p=0.01, tau_h_quantile=q, tau_h_population=population, tau_h_max=math.inf)
    out = apply_token_filter("s2t", lp, ent, adv, valid, FilterParams(s2t))
    assert float(out.s2t.threshold) == pytest.approx(threshold, rel=1e-6)
    assert out.s2t.spurious.nonzero().tolist() == [list(c) for c in silenced]
    assert (int(out.s2t.n_low_prob), int(out.s2t.n_candidates)) == (5, 3)
    assert torch.equal(out.loss_mask, valid & ~out.s2t.spurious)
    # the public mask and the loss take the same keyword
    settings = S2TSettings.resolve(tau_p=0.01, tau_h_quantile=q, tau_h_population=population, tau_h_max=math.inf)
    assert torch.equal(s2t_mask(lp, ent, adv, valid, settings=settings), out.s2t.spurious)


def test_tau_h_max_caps_a_quantile_threshold():
    lp, ent, adv, valid = hand_batch()
    # candidates q.75 -> 1.15 nats, silencing (0, 0) and (0, 1) (H .05, .8); capped at ln 2 only (0, 0) stays
    out = apply_token_filter("s2t", lp, ent, adv, valid, FilterParams(S2TSettings(tau_p=0.01, tau_h_quantile=0.75,
                                                                                     tau_h_max=math.log(2))))
    assert float(out.s2t.threshold) == pytest.approx(math.log(2)) and out.s2t.spurious.nonzero().tolist() == [[0, 0]]
    # an absolute tau_h is not capped
    out = apply_token_filter("s2t", lp, ent, adv, valid,
                             FilterParams(S2TSettings(tau_p=0.01, tau_h=1.0, tau_h_max=0.1)))
    assert float(out.s2t.threshold) == 1.0


def test_masked_fraction_ordering_of_the_three_readings():
    """On a batch shaped like real rollouts (most tokens confident, rare tokens at uncertain positions),
    the 5th percentile over all valid tokens silences nothing while the smaller populations do."""
    g = torch.Generator().manual_seed(0)
    B, T = 16, 256
    confident = torch.rand(B, T, generator=g) < 0.6
    ent = torch.where(confident, torch.rand(B, T, generator=g) * 0.02, 0.3 + torch.rand(B, T, generator=g) * 2.5)
    # the sampled token's probability: near 1 at confident positions, spread elsewhere; a few rare draws
    p = torch.where(confident, 1 - ent / 4, torch.rand(B, T, generator=g) * 0.9 + 0.05)
    rare = torch.rand(B, T, generator=g) < 0.02
    p = torch.where(rare, torch.rand(B, T, generator=g) * 0.009 + 1e-4, p)
    ent = torch.where(rare, ent + 0.2 + torch.rand(B, T, generator=g), ent)  # H >= h_b(p) near rare draws
    adv = torch.randn(B, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    counts = {}
    for population in ("valid", "low_prob", "candidates"):
        _, m = stapo_loss(p.log(), p.log(), adv, valid, ent, s2t=S2TSettings(tau_p=0.01, tau_h_quantile=0.05,
                                                                      tau_h_population=population, tau_h_max=math.inf))
        counts[population] = int(m["s2t_masked_count"])
    # valid: the bound H >= h_b(p) leaves no rare token under the 5th percentile of all entropies;
    # low_prob's 5th percentile sits above candidates' here (the candidates are a subset)
    assert counts["valid"] == 0 < counts["candidates"] < counts["low_prob"]


@pytest.mark.parametrize("name", ["none", "s2t", "high_entropy"])
@pytest.mark.parametrize("population", ["valid", "low_prob", "candidates"])
def test_no_valid_token_silences_nothing_and_raises_nothing(name, population):
    """A micro-batch whose completions are all masked (e.g. every one truncated): no NaN threshold error."""
    lp = torch.full((2, 4), math.log(1e-3))
    out = apply_token_filter(name, lp, torch.zeros(2, 4), torch.ones(2), torch.zeros(2, 4, dtype=torch.bool),
                             FilterParams(S2TSettings(tau_h_population=population)))
    assert not out.loss_mask.any() and not out.s2t.spurious.any()
    assert float(out.s2t.threshold) == -math.inf


def test_empty_population_silences_nothing():
    lp, ent, adv, valid = hand_batch()
    out = apply_token_filter("s2t", lp, ent, -adv.abs(), valid,  # no positive advantage: no candidate
                             FilterParams(S2TSettings(tau_h_population="candidates")))
    assert int(out.s2t.n_candidates) == 0 and not out.s2t.spurious.any()
    assert torch.equal(out.loss_mask, valid)


def test_tau_h_for_fraction_is_the_smallest_threshold_reaching_the_target():
    from stapo.core import tau_h_for_fraction

    lp, ent, adv, valid = hand_batch()
    cand = apply_token_filter("s2t", lp, ent, adv, valid, FilterParams(S2TSettings(tau_p=0.01))).s2t
    candidates = valid & (lp < math.log(0.01)) & (adv[:, None] > 0)
    # 8 valid tokens; candidates' entropies .05 .8 1.5. 1/8 -> k = 1: just above .05
    t = tau_h_for_fraction(ent, candidates, 8, 1 / 8)
    assert 0.05 < t < 0.0500001
    out = apply_token_filter("s2t", lp, ent, adv, valid, FilterParams(S2TSettings(tau_p=0.01, tau_h=t)))
    assert int(out.s2t.n_spurious) == 1 and int(cand.n_candidates) == 3
    assert tau_h_for_fraction(ent, candidates, 8, 2 / 8) > 0.8
    assert tau_h_for_fraction(ent, candidates, 8, 4 / 8) is None  # only 3 candidates
