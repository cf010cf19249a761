"""The three tau_h readings in `stapo analyze`: a plain-Python reference on a fixed rollout batch,
and the binary-entropy bound behind the 'valid' reading."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stapo.analyze.populations import format_population_table, masked_fraction_bound, population_table
from stapo.analyze.tokens import TokenBatch
from stapo.data.rollouts import rollouts_from_records


def _records():
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        n = int(rng.integers(20, 60))
        confident = rng.random(n) < 0.6
        ent = np.where(confident, rng.random(n) * 0.02, 0.3 + rng.random(n) * 2.0)
        p = np.where(confident, 1 - ent / 4, rng.random(n) * 0.9 + 0.05)
        rare = rng.random(n) < 0.05
        p = np.where(rare, rng.random(n) * 0.009 + 1e-4, p)
        ent = np.where(rare, ent + 0.1 + rng.random(n), ent)
        records.append({
            "step": 0, "sample": i, "prompt": "q", "completion": "c" * n, "reward": float(i % 2),
            "advantage": float(rng.normal()), "token_id": list(range(n)), "token_text": ["t"] * n,
            "logprob": np.log(p).astype(np.float32), "entropy": ent.astype(np.float32),
            "collision": (p ** 2).astype(np.float32), "s2t": np.zeros(n, dtype=bool),
        })
    return records


def _reference(records, population, q, tau_p=0.01):
    toks = [(r["advantage"], float(lp), float(h)) for r in records for lp, h in zip(r["logprob"], r["entropy"])]
    pop = {"valid": toks,
           "low_prob": [t for t in toks if math.exp(t[1]) < tau_p],
           "candidates": [t for t in toks if math.exp(t[1]) < tau_p and t[0] > 0]}[population]
    ents = sorted(t[2] for t in pop)
    if not ents:
        return None, 0
    pos = q * (len(ents) - 1)
    lo = math.floor(pos)
    thr = ents[lo] + (ents[min(lo + 1, len(ents) - 1)] - ents[lo]) * (pos - lo)
    return thr, sum(1 for a, lp, h in toks if a > 0 and math.exp(lp) < tau_p and h < thr)


def test_population_table_against_plain_python():
    records = _records()
    rows = population_table(TokenBatch(rollouts_from_records(records)), tau_p=0.01)  # uncapped (inf)
    assert [(r.population, r.quantile) for r in rows][:4] == [("valid", q) for q in (0.01, 0.05, 0.1, 0.2)]
    n = sum(len(r["logprob"]) for r in records)
    for row in rows:
        thr, masked = _reference(records, row.population, row.quantile)
        assert row.threshold == pytest.approx(thr, rel=1e-5)
        assert row.masked == masked and row.masked_frac == pytest.approx(masked / n)
        all_ent = [float(h) for r in records for h in r["entropy"]]
        assert row.threshold_percentile == pytest.approx(100 * sum(h < thr for h in all_ent) / n, abs=1e-9)
    by = {(r.population, r.quantile): r for r in rows}
    assert by[("valid", 0.05)].masked == 0 < by[("candidates", 0.05)].masked
    text = "\n".join(format_population_table(rows))
    assert "| candidates | 0.05 |" in text and text.count("\n") == len(rows) + 1


def test_binary_entropy_bound():
    # the numbers behind the 'valid' reading's emptiness (docs/analyze.md)
    assert masked_fraction_bound(0.062, 0.05) == pytest.approx(0.00057, rel=0.05)
    assert masked_fraction_bound(0.01, 0.05) == pytest.approx(0.000065, rel=0.05)
    p = masked_fraction_bound(0.3, 1.0)
    assert -(p * math.log(p) + (1 - p) * math.log(1 - p)) == pytest.approx(0.3, rel=1e-6)
    assert masked_fraction_bound(0.0, 0.05) == 0.0 and masked_fraction_bound(5.0, 0.05) == 0.025
