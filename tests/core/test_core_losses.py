import math

import pytest
import torch

from stapo.core import (
    AGGREGATIONS,
    S2TSettings,
    entropy_quantile,
    global_token_count,
    high_entropy_loss,
    high_entropy_mask,
    policy_loss,
    s2t_mask,
    stapo_loss,
)

# The references below take the quantile over all valid tokens, uncapped: the literal reading.
LITERAL = dict(tau_h_population="valid", tau_h_max=math.inf)


# ---- independent float64 reference ------------------------------------------------------

def ref_loss(lp, old, adv, mask, cl, ch, c=None, agg="token-mean", num_tokens=None, num_seqs=None, horizon=None):
    """Scalar python loops in float64 (no shared code with the implementation)."""
    B, T = lp.shape
    terms = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            a = float(adv[i] if adv.dim() == 1 else adv[i, t])
            lr = max(-20.0, min(20.0, float(lp[i, t]) - float(old[i, t])))
            r = math.exp(lr)
            term = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
            if c is not None and a < 0:
                term = min(term, -a * c)
            terms[i][t] = term
    m = [[bool(mask[i, t]) for t in range(T)] for i in range(B)]
    if agg == "token-mean":
        n = sum(map(sum, m)) if num_tokens is None else num_tokens
        s = sum(terms[i][t] for i in range(B) for t in range(T) if m[i][t])
        return s / n if n > 0 else 0.0
    seqs = []
    for i in range(B):
        cnt = sum(m[i])
        if cnt == 0:
            continue
        s = sum(terms[i][t] for t in range(T) if m[i][t])
        seqs.append(s / cnt if agg == "seq-mean-token-mean" else s)
    n = len(seqs) if num_seqs is None else num_seqs
    out = sum(seqs) / n if n > 0 else 0.0
    if agg == "seq-mean-token-sum-norm":
        out /= T if horizon is None else horizon
    return out


def random_batch(seed, B=5, T=9, adv_per_token=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    lp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios spread across the clip range
    adv_shape = (B, T) if adv_per_token else (B,)
    adv = torch.randn(*adv_shape, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, :] = False  # a fully-masked sequence
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask, ent.to(dtype)


# ---- values --------------------------------------------------------------------------------

def test_hand_worked_token_mean():
    # tokens: ratio 1.5 with A=+1 -> clipped at 1.2: term -1.2; ratio 0.5 with A=+1 -> -0.5;
    # ratio 0.5 with A=-2 -> max(1.0, 2*0.8=1.6) = 1.6; ratio 4 with A=-2, dual clip c=3 -> min(8, 6) = 6
    lp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 4.0]]))
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -2.0])
    loss, m = policy_loss(lp, old, adv, torch.ones(2, 2), clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.6 + 6.0) / 4, abs=1e-6)
    # clip fractions: high = ratio 1.5 with A>0 (1 of 4); low = ratio 0.5 with A<0 (1 of 4)
    assert float(m["clip_frac_high"]) == pytest.approx(0.25)
    assert float(m["clip_frac_low"]) == pytest.approx(0.25)
    assert float(m["ratio_max"]) == pytest.approx(4.0)
    assert float(m["num_tokens"]) == 4


def test_hand_worked_aggregations():
    # ratio 1 everywhere -> term = -A. A = [1, 2]; mask row0: 2 tokens, row1: 1 token of T=4
    lp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, 2.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    expect = {
        "token-mean": (-1 - 1 - 2) / 3,
        "seq-mean-token-mean": ((-1 - 1) / 2 + (-2) / 1) / 2,
        "seq-mean-token-sum": ((-1 - 1) + (-2)) / 2,
        "seq-mean-token-sum-norm": ((-1 - 1) + (-2)) / 2 / 4,
    }
    for agg, value in expect.items():
        loss, _ = policy_loss(lp, lp, adv, mask, agg=agg)
        assert float(loss) == pytest.approx(value), agg


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("c", [None, 3.0])
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_policy_loss_against_reference(agg, c, adv_per_token):
    lp, old, adv, mask, _ = random_batch(1, adv_per_token=adv_per_token)
    for cl, ch in [(0.2, 0.2), (0.2, 0.28)]:
        got, _ = policy_loss(lp, old, adv, mask, cl, ch, c, agg=agg)
        want = ref_loss(lp.double(), old.double(), adv.double(), mask, cl, ch, c, agg)
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)
        got, _ = policy_loss(lp, old, adv, mask, cl, ch, c, agg=agg, num_tokens=17.0, num_seqs=3, horizon=5)
        want = ref_loss(lp.double(), old.double(), adv.double(), mask, cl, ch, c, agg, 17.0, 3, 5)
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_bf16_inputs_computed_in_float32():
    lp, old, adv, mask, _ = random_batch(2)
    got, _ = policy_loss(lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert got.dtype == torch.float32
    want = ref_loss(lp.bfloat16().double(), old.bfloat16().double(), adv.bfloat16().double(), mask, 0.2, 0.2)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_log_ratio_clamped():
    lp = torch.tensor([[50.0]])
    loss, m = policy_loss(lp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert float(loss) == pytest.approx(math.exp(20.0), rel=1e-5)
    assert torch.isfinite(loss)


# ---- gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_gradients_match_finite_differences(agg):
    lp, old, adv, mask, _ = random_batch(3, B=3, T=4, dtype=torch.float64)
    lp = lp.clone().requires_grad_()
    # finite differences are exact away from the clip kinks; keep ratios off them.
    torch.autograd.gradcheck(
        lambda x: policy_loss(x, old, adv, mask, 0.2, 0.28, 3.0, agg=agg)[0], (lp,), eps=1e-7, atol=1e-6
    )


def test_stapo_gradcheck_and_masked_grads_exactly_zero():
    lp, old, adv, mask, ent = random_batch(4, B=4, T=8, dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, 0.5], dtype=torch.float64)
    lp = lp.clone().requires_grad_()
    spurious = s2t_mask(lp, ent, adv, mask, settings=S2TSettings.resolve(tau_p=0.5, tau_h=1.5))
    assert spurious.any() and (mask & ~spurious).any()
    loss, m = stapo_loss(lp, old, adv, mask, ent, s2t=S2TSettings.resolve(tau_p=0.5, tau_h=1.5))
    loss.backward()
    assert torch.equal(lp.grad[spurious], torch.zeros(int(spurious.sum()), dtype=torch.float64))
    assert torch.equal(lp.grad[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert int(m["s2t_masked_count"]) == int(spurious.sum())
    torch.autograd.gradcheck(
        lambda x: stapo_loss(x, old, adv, mask, ent, s2t=S2TSettings.resolve(tau_p=0.5, tau_h=1.5))[0],
        (lp.detach().requires_grad_(),),
        eps=1e-7, atol=1e-6,
    )


# ---- STAPO ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_stapo_equals_policy_loss_on_unmasked_tokens(seed):
    lp, old, adv, mask, ent = random_batch(seed, B=6, T=12)
    spurious = s2t_mask(lp, ent, adv, mask, settings=S2TSettings.resolve(tau_p=0.3, tau_h_quantile=0.5, **LITERAL))
    assert spurious.any()
    got, m = stapo_loss(lp, old, adv, mask, ent, s2t=S2TSettings.resolve(tau_p=0.3, tau_h_quantile=0.5, **LITERAL),
                        clip_high=0.28)
    want = ref_loss(lp.double(), old.double(), adv.double(), mask & ~spurious, 0.2, 0.28)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # the denominator counts only unmasked valid tokens
    assert float(m["num_tokens"]) == int((mask & ~spurious).sum())
    assert float(m["s2t_masked_frac"]) == pytest.approx(int(spurious.sum()) / int(mask.sum()))
    p = lp.exp()
    assert float(m["frac_low_prob"]) == pytest.approx(float(((p < 0.3) & mask).sum() / mask.sum()))
    thr = float(entropy_quantile(ent, mask, 0.5))
    assert float(m["entropy_threshold"]) == pytest.approx(thr)
    assert float(m["frac_low_entropy"]) == pytest.approx(float(((ent < thr) & mask).sum() / mask.sum()))


def test_stapo_with_mask_off_equals_policy_loss():
    lp, old, adv, mask, ent = random_batch(7)
    for agg in AGGREGATIONS:
        a, _ = stapo_loss(lp, old, adv, mask, ent, s2t=S2TSettings.resolve(tau_p=0.0), agg=agg)
        b, _ = policy_loss(lp, old, adv, mask, agg=agg)
        assert float(a) == float(b)


@pytest.mark.parametrize("fn", ["policy", "stapo"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_everything_masked_or_empty_gives_zero_loss_and_zero_grad(fn, agg):
    for B, T, mask in [(3, 4, torch.zeros(3, 4)), (0, 5, torch.zeros(0, 5)), (2, 0, torch.zeros(2, 0))]:
        lp = torch.zeros(B, T, requires_grad=True)
        adv = torch.ones(B)
        if fn == "policy":
            loss, m = policy_loss(lp, lp.detach(), adv, mask, agg=agg)
        else:
            loss, m = stapo_loss(lp, lp.detach(), adv, mask, torch.zeros(B, T), agg=agg)
        loss.backward()
        assert float(loss) == 0.0 and torch.isfinite(loss)
        assert torch.equal(lp.grad, torch.zeros(B, T))
        assert all(torch.isfinite(v).all() for v in m.values())


def test_every_valid_token_spurious_gives_zero_loss():
    lp = torch.full((2, 3), math.log(0.001), requires_grad=True)
    loss, m = stapo_loss(lp, lp.detach(), torch.ones(2), torch.ones(2, 3), torch.zeros(2, 3),
                         s2t=S2TSettings.resolve(tau_p=0.01, tau_h=1.0))
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(lp.grad, torch.zeros(2, 3))
    assert float(m["s2t_masked_frac"]) == 1.0


# ---- micro-batch invariance ----------------------------------------------------------------

@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("split", [[2, 2, 2], [1, 5], [3, 3]])
def test_micro_batches_sum_to_full_batch(agg, split):
    lp, old, adv, mask, ent = random_batch(11, B=6, T=10)
    thr = float(entropy_quantile(ent, mask, 0.3))  # one threshold for the whole batch
    spurious = s2t_mask(lp, ent, adv, mask, settings=S2TSettings.resolve(tau_p=0.3, tau_h=thr))
    assert spurious.any()
    kw = dict(s2t=S2TSettings(tau_p=0.3, tau_h=thr), agg=agg, num_tokens=global_token_count(mask & ~spurious),
              num_seqs=int(((mask & ~spurious).sum(-1) > 0).sum()), horizon=10)
    lp_full = lp.clone().requires_grad_()
    full, _ = stapo_loss(lp_full, old, adv, mask, ent, **kw)
    full.backward()
    lp_parts = lp.clone().requires_grad_()
    total = 0.0
    start = 0
    for n in split:
        sl = slice(start, start + n)
        part, _ = stapo_loss(lp_parts[sl], old[sl], adv[sl], mask[sl], ent[sl], **kw)
        part.backward()
        total = total + part.detach()
        start += n
    assert float(total) == pytest.approx(float(full), abs=1e-6)
    torch.testing.assert_close(lp_parts.grad, lp_full.grad, atol=1e-6, rtol=0)


# ---- 20-Entropy ------------------------------------------------------------------------------

def test_high_entropy_loss_keeps_full_denominator():
    lp, old, adv, mask, ent = random_batch(5, B=4, T=10)
    keep = high_entropy_mask(ent, mask, 0.2)
    loss, m = high_entropy_loss(lp, old, adv, mask, ent, top_entropy_quantile=0.2)
    want = ref_loss(lp.double(), old.double(), adv.double(), keep, 0.2, 0.2, num_tokens=int(mask.sum()))
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(m["entropy_kept_frac"]) == pytest.approx(int(keep.sum()) / int(mask.sum()))


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(old_logprobs=torch.zeros(2, 4)), "old_logprobs must have the shape of logprobs"),
        (dict(loss_mask=torch.ones(3, 3)), "loss_mask must have shape"),
        (dict(advantages=torch.ones(2, 2)), "advantages"),
        (dict(old_logprobs=torch.full((2, 3), float("nan"))), "old_logprobs contains non-finite"),
        (dict(advantages=torch.tensor([1.0, float("inf")])), "advantages contains non-finite"),
        (dict(agg="sum"), "agg must be one of"),
        (dict(clip_ratio_c=0.5), "clip_ratio_c must be a number > 1"),
        (dict(clip_low=-0.1), "clip_low must be a number >= 0"),
        (dict(num_tokens=float("nan")), "num_tokens must be a finite number"),
        (dict(logprobs=torch.zeros(6)), "logprobs must be 2-D"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    args = dict(logprobs=torch.zeros(2, 3), old_logprobs=torch.zeros(2, 3), advantages=torch.ones(2),
                loss_mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


def test_stapo_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="entropy must have the shape of logprobs"):
        stapo_loss(z, z, torch.ones(2), torch.ones(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="entropy contains non-finite"):
        stapo_loss(z, z, torch.ones(2), torch.ones(2, 3), torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="tau_p must be a number in"):
        stapo_loss(z, z, torch.ones(2), torch.ones(2, 3), z, s2t=S2TSettings.resolve(tau_p=2.0))
