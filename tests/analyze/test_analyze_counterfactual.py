"""`stapo.analyze.counterfactual`: the one-step measurements against direct recomputation, empty sets,
intervals; the CLI's --quick path (slow: loads the embedded model)."""

from __future__ import annotations

import math

import pytest
import torch

from stapo.analyze.counterfactual import (
    CounterfactualConfig,
    HeldOut,
    Measurement,
    ScoredBatch,
    confidence_interval,
    sgd_step,
    summarize_measurements,
    token_sets,
)

torch.set_num_threads(1)


def test_confidence_interval_hand_worked():
    c = confidence_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.303: half width 4.303 / sqrt(3)
    assert c["mean"] == 2.0 and c["sd"] == pytest.approx(1.0)
    assert c["hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert confidence_interval([])["n"] == 0
    assert math.isnan(confidence_interval([5.0])["lo"])


def _batch(n=40, v=30, hdim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=g)
    head = torch.randn(v, hdim, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    lp = (hidden @ head.T).log_softmax(-1)
    ent = -(lp.exp() * lp).sum(-1)
    adv = torch.where(torch.arange(n) % 3 == 0, -1.0, 0.5)
    s2t = torch.zeros(n, dtype=torch.bool)
    s2t[[1, 4, 7]] = True
    return ScoredBatch(hidden, targets, lp[torch.arange(n), targets], ent, adv, s2t, 0.5, 0.5, 8), head


def test_sgd_step_is_gradient_of_restricted_loss():
    batch, head = _batch()
    idx = torch.tensor([1, 4, 7])
    new = sgd_step(head, batch, idx, lr=1e-2, temperature=1.0)
    w = head.clone().double().requires_grad_()
    lp = (batch.hidden.double()[idx] @ w.T).log_softmax(-1)[torch.arange(3), batch.targets[idx]]
    (-(batch.advantage.double()[idx] * lp).sum()).backward()
    torch.testing.assert_close(new.double(), head.double() - 1e-2 * w.grad, rtol=1e-5, atol=1e-6)


def test_heldout_entropy_and_kl_match_direct():
    batch, head = _batch()
    ho = HeldOut(batch.hidden[:11], temperature=0.8, rows_per_chunk=4)
    new = head + 0.1 * torch.randn(head.shape, generator=torch.Generator().manual_seed(3))
    h_old, h_new, kl = ho.entropy_and_kl(head, new)
    lo = (batch.hidden[:11].double() @ head.double().T / 0.8).log_softmax(-1)
    ln = (batch.hidden[:11].double() @ new.double().T / 0.8).log_softmax(-1)
    assert h_old == pytest.approx(float(-(lo.exp() * lo).sum(-1).mean()), rel=1e-5)
    assert h_new == pytest.approx(float(-(ln.exp() * ln).sum(-1).mean()), rel=1e-5)
    assert kl == pytest.approx(float((lo.exp() * (lo - ln)).sum(-1).mean()), rel=1e-4)
    assert kl > 0


def test_token_sets_sizes_and_membership():
    batch, _ = _batch()
    sets = token_sets(batch, tau_p=0.2, draws=5, gen=torch.Generator().manual_seed(0))
    assert sets["s2t"][0].tolist() == [1, 4, 7]
    assert len(sets["random"]) == 5
    for r in sets["random"]:
        assert r.numel() == 3 and bool((batch.advantage[r] > 0).all()) and len(set(r.tolist())) == 3
    lowp = sets["lowp_hiH"][0]
    assert bool((batch.logprob[lowp].exp() < 0.2).all() and (batch.entropy[lowp] >= 0.5).all())
    assert sets["all"][0].numel() == 40


def test_empty_sets_are_reported_not_averaged():
    ms = [Measurement("sgd", b, "s2t", 0, 0, *(float("nan"),) * 4) for b in range(2)]
    ms += [Measurement("sgd", b, "all", 0, 10, 0.1 * (b + 1), 0.01, 0.01 * (b + 1), 0.001) for b in range(2)]
    s = summarize_measurements(ms)
    assert s["sgd"]["s2t"]["empty_units"] == 2 and s["sgd"]["s2t"]["d_entropy_per_token"]["n"] == 0
    assert s["sgd"]["all"]["d_entropy_per_token"]["mean"] == pytest.approx(0.015)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="group_size"):
        CounterfactualConfig(group_size=1)
    with pytest.raises(ValueError, match="sgd_lr"):
        CounterfactualConfig(sgd_lr=0.0)


@pytest.mark.slow  # loads the embedded model and samples: ~40 s of CPU
def test_cli_quick(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    env = {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    res = subprocess.run([sys.executable, "-m", "stapo", "analyze", "counterfactual", "--quick", "--tau-h", "2.0",
                          "--tau-p", "0.2", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "counterfactual.json").read_text())
    assert {"sgd", "adamw"} <= set(data["summary"])
    assert len(data["batches"]) == 2 and (tmp_path / "counterfactual.md").is_file()
    assert "reading" in res.stdout
