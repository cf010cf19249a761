import math

import pytest
import torch
from gloo_ranks import gloo_group, spawn_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

from stapo.core import S2TSettings, entropy_quantile, high_entropy_mask, quantile_linear, s2t_mask

# The references below take the quantile over all valid tokens, uncapped: the literal reading.
LITERAL = dict(tau_h_population="valid", tau_h_max=math.inf)


def ref_quantile(values, q):
    v = sorted(float(x) for x in values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ref_s2t(lp, ent, adv, valid, tau_p, tau_h=None, q=0.05):
    B, T = lp.shape
    vals = [float(ent[i, t]) for i in range(B) for t in range(T) if valid[i, t]]
    thr = tau_h if tau_h is not None else (ref_quantile(vals, q) if vals else -math.inf)
    out = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        for t in range(T):
            a = float(adv[i] if adv.dim() == 1 else adv[i, t])
            if valid[i, t] and a > 0 and math.exp(float(lp[i, t])) < tau_p and float(ent[i, t]) < thr:
                out[i, t] = True
    return out


def test_hand_worked_mask():
    # p = exp(lp): [0.005, 0.5, 0.001, 0.005]; H: [0.1, 0.1, 2.0, 0.1]
    lp = torch.log(torch.tensor([[0.005, 0.5, 0.001, 0.005], [0.005, 0.005, 0.005, 0.005]]))
    ent = torch.tensor([[0.1, 0.1, 2.0, 0.1], [0.1, 0.1, 0.1, 0.1]])
    adv = torch.tensor([1.0, -1.0])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    m = s2t_mask(lp, ent, adv, valid, settings=S2TSettings.resolve(tau_p=0.01, tau_h=0.5))
    # row 0: token 0 spurious; token 1 too likely; token 2 too uncertain; token 3 padding.
    # row 1: negative advantage -> never spurious.
    assert m.tolist() == [[True, False, False, False], [False, False, False, False]]


def test_quantile_threshold_hand_worked():
    # valid entropies [0.0, 1.0, 2.0, 3.0, 4.0]; q = 0.25 -> threshold 1.0 (linear), strict "<"
    ent = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    lp = torch.full((1, 5), math.log(0.001))
    m = s2t_mask(lp, ent, torch.tensor([1.0]), torch.ones(1, 5),
                 settings=S2TSettings.resolve(tau_p=0.01, tau_h_quantile=0.25, **LITERAL))
    assert m.tolist() == [[True, False, False, False, False]]
    m = s2t_mask(lp, ent, torch.tensor([1.0]), torch.ones(1, 5),
                 settings=S2TSettings.resolve(tau_p=0.01, tau_h_quantile=0.3, **LITERAL))
    assert m.tolist() == [[True, True, False, False, False]]  # threshold 1.2


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_against_reference_random(seed, per_token_adv):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 17
    lp = -torch.rand(B, T, generator=g) * 8
    ent = torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.2
    for tau_p, tau_h, q in [(0.01, None, 0.05), (0.1, None, 0.5), (0.05, 1.0, 0.05), (0.2, None, 1.0)]:
        got = s2t_mask(lp, ent, adv, valid,
                       settings=S2TSettings.resolve(tau_p=tau_p, tau_h=tau_h, tau_h_quantile=q, **LITERAL))
        assert torch.equal(got, ref_s2t(lp.double(), ent.double(), adv.double(), valid, tau_p, tau_h, q))


def test_quantile_over_valid_tokens_only():
    ent = torch.tensor([[0.5, 0.6, 100.0], [0.7, 100.0, 100.0]])
    valid = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert float(entropy_quantile(ent, valid, 1.0)) == pytest.approx(0.7)
    assert float(entropy_quantile(ent, valid, 0.5)) == pytest.approx(0.6)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0.0, 0.05, 0.33, 0.5, 0.95, 1.0])
def test_quantile_matches_torch(n, q):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(quantile_linear(x, q), torch.quantile(x, q))


def test_no_gradient_and_half_inputs():
    lp = (torch.log(torch.tensor([[0.001, 0.5]])).bfloat16()).requires_grad_()
    ent = torch.tensor([[0.01, 0.02]], dtype=torch.float16)
    m = s2t_mask(lp, ent, torch.tensor([1.0]), torch.ones(1, 2), settings=S2TSettings.resolve(tau_p=0.01, tau_h=0.5))
    assert m.dtype == torch.bool and not m.requires_grad
    assert m.tolist() == [[True, False]]


def test_all_invalid_masks_nothing():
    z = torch.zeros(2, 3)
    assert not s2t_mask(z - 10, z, torch.ones(2), torch.zeros(2, 3)).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logprobs=torch.zeros(2, 3, 1)), "logprobs must be 2-D"),
        (dict(entropy=torch.zeros(2, 4)), "entropy must have the shape of logprobs"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(response_mask=torch.ones(2, 4)), "response_mask must have shape"),
        (dict(response_mask=torch.full((2, 3), 2)), "response_mask must be bool or contain only 0 and 1"),
        (dict(logprobs=torch.full((2, 3), float("nan"))), "logprobs contains non-finite"),
        (dict(entropy=torch.full((2, 3), float("inf"))), "entropy contains non-finite"),
        (dict(tau_p=1.5), "tau_p must be a number in"),
        (dict(tau_h_quantile=-0.1, **LITERAL), "tau_h_quantile must be a number in"),
        (dict(tau_h=float("nan")), "tau_h must be a number >= 0"),
        (dict(logprobs=torch.zeros(2, 3, dtype=torch.long)), "logprobs must be a floating-point"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    args = dict(
        logprobs=torch.zeros(2, 3), entropy=torch.zeros(2, 3), advantages=torch.ones(2),
        response_mask=torch.ones(2, 3), tau_p=0.01, tau_h=None, tau_h_quantile=0.05,
    )
    args.update(kwargs)
    s2t = {k: args.pop(k) for k in list(args) if k.startswith("tau_")}
    with pytest.raises(ValueError, match=match):
        s2t_mask(**args, settings=S2TSettings.resolve(s2t))


def test_non_finite_on_padding_is_ignored():
    lp = torch.tensor([[math.log(0.001), float("nan")]])
    ent = torch.tensor([[0.0, float("inf")]])
    m = s2t_mask(lp, ent, torch.ones(1), torch.tensor([[1, 0]]), settings=S2TSettings.resolve(tau_p=0.01, tau_h=0.5))
    assert m.tolist() == [[True, False]]


# --- properties ---------------------------------------------------------------------------

arrays = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-12, 0, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.floats(0, 5, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.floats(-2, 2, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(arrays, st.floats(0, 1), st.floats(0, 1), st.floats(0, 5), st.floats(0, 5))
def test_mask_monotone_and_never_nonpositive_advantage(data, p1, p2, h1, h2):
    lp, ent, adv, valid = (torch.tensor([x]) for x in data)
    lo_p, hi_p = sorted((p1, p2))
    lo_h, hi_h = sorted((h1, h2))
    base = dict(logprobs=lp, entropy=ent, advantages=adv, response_mask=valid)
    m_lo_p = s2t_mask(**base, settings=S2TSettings.resolve(tau_p=lo_p, tau_h=lo_h))
    m_hi_p = s2t_mask(**base, settings=S2TSettings.resolve(tau_p=hi_p, tau_h=lo_h))
    m_hi_h = s2t_mask(**base, settings=S2TSettings.resolve(tau_p=lo_p, tau_h=hi_h))
    assert not (m_lo_p & ~m_hi_p).any()  # monotone in tau_p
    assert not (m_lo_p & ~m_hi_h).any()  # monotone in tau_h
    for m in (m_lo_p, m_hi_p, m_hi_h):
        assert not (m & (adv <= 0)).any()
        assert not (m & ~valid).any()
    # quantile thresholds are monotone too
    q_lo = s2t_mask(**base, settings=S2TSettings.resolve(tau_p=hi_p, tau_h_quantile=lo_h / 5, **LITERAL))
    q_hi = s2t_mask(**base, settings=S2TSettings.resolve(tau_p=hi_p, tau_h_quantile=hi_h / 5, **LITERAL))
    assert not (q_lo & ~q_hi).any()


def test_high_entropy_mask_hand_worked():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7], [0.2, 0.8, 0.4, 0.6, 9.0]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    # 9 valid entropies 0.1..0.9; 0.8-quantile (linear) = 0.74 -> keep 0.8, 0.9
    keep = high_entropy_mask(ent, valid, top_quantile=0.2)
    assert keep.tolist() == [[False, True, False, False, False], [False, True, False, False, False]]
    assert keep.sum() == 2


@pytest.mark.parametrize("seed", range(3))
def test_high_entropy_mask_reference(seed):
    g = torch.Generator().manual_seed(seed)
    ent = torch.rand(5, 11, generator=g)
    valid = torch.rand(5, 11, generator=g) > 0.3
    for rho in (0.2, 0.5, 1.0):
        thr = ref_quantile(ent[valid].tolist(), 1 - rho)
        expected = valid & (ent.double() >= thr)
        assert torch.equal(high_entropy_mask(ent, valid, rho), expected)
    with pytest.raises(ValueError, match="top_quantile must be"):  # rho = 0 would keep no token
        high_entropy_mask(ent, valid, 0.0)


def test_quantile_linear_large_random_trials():
    """Random sizes, quantiles and ties: the kthvalue quantile equals torch.quantile."""
    g = torch.Generator().manual_seed(11)
    for trial in range(30):
        n = int(torch.randint(1, 20000, (1,), generator=g))
        q = float(torch.rand(1, generator=g)) if trial % 5 else float(trial % 2)
        x = torch.rand(n, generator=g).pow(float(torch.rand(1, generator=g)) * 5 + 0.2) * 3
        if trial % 4 == 0:
            x = torch.round(x * 8) / 8
        assert float(quantile_linear(x, q)) == pytest.approx(float(torch.quantile(x, q)), rel=1e-6, abs=1e-7)


def _quantile_rank(rank, world, port, out_dir):
    with gloo_group(rank, world, port):
        g = torch.Generator().manual_seed(rank)
        ent = torch.rand(3, 11, generator=g) * 2
        valid = torch.rand(3, 11, generator=g) < (0.3 if rank == 0 else 0.9)  # different counts per rank
        torch.save({"ent": ent, "valid": valid, "q": entropy_quantile(ent, valid, 0.05),
                    "q_top": entropy_quantile(ent, valid, 0.8)}, f"{out_dir}/rank{rank}.pt")


def test_entropy_quantile_is_global_across_ranks(tmp_path):
    """Two gloo ranks with different numbers of valid tokens: both get the quantile of all of them."""
    spawn_ranks(_quantile_rank, 2, str(tmp_path))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    everything = torch.cat([r["ent"][r["valid"]] for r in res])
    for r in res:
        assert float(r["q"]) == pytest.approx(ref_quantile(everything.tolist(), 0.05), rel=1e-6)
        assert float(r["q_top"]) == pytest.approx(ref_quantile(everything.tolist(), 0.8), rel=1e-6)
    local = entropy_quantile(res[0]["ent"], res[0]["valid"], 0.05)  # not distributed: this rank's own
    assert float(local) == pytest.approx(ref_quantile(res[0]["ent"][res[0]["valid"]].tolist(), 0.05), rel=1e-6)
    assert math.isnan(float(entropy_quantile(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0.5)))
