"""S2T's mini-batch scope in core: tau_h over a whole optimizer step, however the step is split.

The reference is the decision on the whole batch at once (one `s2t_decision` call); the step split
into 1, 2 and 4 micro-batches, or over 2 gloo ranks, must give the same threshold and the same mask
when each part uses `s2t_threshold` over every part's `s2t_population`.
"""

from __future__ import annotations

import math

import pytest
import torch
from gloo_ranks import gloo_group, spawn_ranks

from stapo.core import (
    PRESETS,
    S2T_READINGS,
    TOKEN_FILTERS,
    S2TSettings,
    apply_token_filter,
    s2t_decision,
    s2t_population,
    s2t_threshold,
    stapo_loss,
)


def step_batch(seed=0, rows=16, T=12):
    """A batch where most sampled tokens are improbable (p < 0.002) and entropies spread widely."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log(torch.rand(rows, T, generator=g, dtype=torch.float64) * 0.004)
    ent = torch.rand(rows, T, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    lengths = torch.randint(T // 3, T + 1, (rows,), generator=g)
    valid = torch.arange(T)[None, :] < lengths[:, None]
    return lp, ent, adv, valid


def split_decisions(batch, parts: int, settings: S2TSettings, scope_threshold: bool):
    lp, ent, adv, valid = batch
    chunks = [torch.tensor_split(x, parts) for x in (lp, ent, adv, valid)]
    threshold = None
    if scope_threshold:
        threshold = s2t_threshold([s2t_population(*c, settings) for c in zip(*chunks)], settings)
    return [s2t_decision(*c, settings, step_tau_h=threshold) for c in zip(*chunks)]


def ref_threshold(batch, settings: S2TSettings) -> float:
    """float64 re-computation of the paper's tau_h: the q-quantile (linear) of the candidates' entropies."""
    lp, ent, adv, valid = batch
    cand = valid & (lp < math.log(settings.tau_p)) & (adv[:, None] > 0)
    vals = sorted(ent[cand].tolist())
    pos = settings.tau_h_quantile * (len(vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (pos - lo) * (vals[hi] - vals[lo])


def test_defaults_are_the_paper_rule():
    s = S2TSettings()
    assert (s.tau_p, s.tau_h, s.tau_h_quantile, s.tau_h_population, s.tau_h_max, s.tau_h_scope) == (
        0.002, None, 0.75, "candidates", math.inf, "mini_batch")
    assert S2T_READINGS["paper"] == s
    former = S2T_READINGS["former"]
    assert (former.tau_p, former.tau_h_quantile, former.tau_h_max) == (0.01, 0.05, pytest.approx(math.log(2)))
    assert PRESETS["stapo"].s2t_settings == s
    with pytest.raises(ValueError, match="tau_h_scope must be one of mini_batch, micro_batch"):
        S2TSettings(tau_h_scope="step")


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_mini_batch_scope_is_split_invariant(parts):
    batch = step_batch()
    s = S2TSettings()
    whole = s2t_decision(*batch, s)
    assert float(whole.threshold) == pytest.approx(ref_threshold(batch, s), rel=1e-6)
    got = split_decisions(batch, parts, s, scope_threshold=True)
    assert torch.equal(torch.cat([d.spurious for d in got]), whole.spurious)
    for d in got:
        assert float(d.threshold) == pytest.approx(float(whole.threshold), rel=1e-6)
    assert sum(int(d.n_spurious) for d in got) == int(whole.n_spurious) > 0


def test_micro_batch_scope_differs_from_the_step():
    """Without the step's threshold each micro-batch takes its own quantile: another decision (so the
    invariance above is a property of the scope, not of this batch)."""
    batch = step_batch()
    s = S2TSettings()
    whole = s2t_decision(*batch, s)
    own = split_decisions(batch, 4, s, scope_threshold=False)
    assert {round(float(d.threshold), 6) for d in own} != {round(float(whole.threshold), 6)}
    assert not torch.equal(torch.cat([d.spurious for d in own]), whole.spurious)


def test_step_threshold_reaches_the_loss_and_every_filter():
    lp, ent, adv, valid = step_batch()
    s = S2TSettings()
    thr = torch.tensor(1.0)
    _, m = stapo_loss(lp, lp.detach(), adv, valid, ent, s, step_tau_h=thr)
    expected = valid & (lp < math.log(0.002)) & (adv[:, None] > 0) & (ent < 1.0)
    assert int(m["s2t_masked_count"]) == int(expected.sum()) > 0
    for name in TOKEN_FILTERS:
        out = apply_token_filter(name, lp, ent, adv, valid, step_tau_h=thr)
        assert torch.equal(out.s2t.spurious, expected)


def test_absolute_tau_h_ignores_the_population():
    s = S2TSettings(tau_h=0.5)
    assert float(s2t_threshold([], s)) == 0.5
    assert float(s2t_threshold([], S2TSettings())) == -math.inf  # an empty population silences nothing


def test_filter_properties_not_names():
    """Engines read these properties; the table is the module docstring's."""
    props = {n: (f.applies_s2t, f.denominator, f.uses_top_entropy_quantile) for n, f in TOKEN_FILTERS.items()}
    assert props == {"none": (False, "kept", False), "s2t": (True, "kept", False),
                     "high_entropy": (False, "valid", True)}
    assert PRESETS["stapo"].filter.applies_s2t and not PRESETS["justrl"].filter.applies_s2t
    assert PRESETS["20-entropy"].filter.denominator == "valid"


def _scope_rank(rank, world, port, out_dir):
    with gloo_group(rank, world, port):
        lp, ent, adv, valid = step_batch()
        rows = torch.tensor_split(torch.arange(lp.shape[0]), world)[rank]
        s = S2TSettings()
        mine = (lp[rows], ent[rows], adv[rows], valid[rows])
        halves = [tuple(x[sl] for x in mine) for sl in (slice(0, 2), slice(2, None))]  # 2 micro-batches a rank
        thr = s2t_threshold([s2t_population(*h, s) for h in halves], s)
        spurious = torch.cat([s2t_decision(*h, s, step_tau_h=thr).spurious for h in halves])
        torch.save({"rows": rows, "thr": thr, "spurious": spurious}, f"{out_dir}/rank{rank}.pt")


def test_mini_batch_scope_over_two_ranks(tmp_path):
    spawn_ranks(_scope_rank, 2, str(tmp_path))
    batch = step_batch()
    whole = s2t_decision(*batch, S2TSettings())
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert float(res["thr"]) == pytest.approx(float(whole.threshold), rel=1e-6)
        assert torch.equal(res["spurious"], whole.spurious[res["rows"]])
