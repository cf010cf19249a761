"""Σπ² log π from both heads and the first-order entropy change ΔH, against float64 and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from stapo.core.head import token_logprobs_entropy
from stapo.core.lm_head import lm_head_logprobs_entropy
from stapo.core.stats import entropy_change_first_order

torch.set_num_threads(1)


def ref_stats(z, t, temperature=1.0):
    """float64: log-prob of t, entropy, Σπ², Σπ² log π of softmax(z / T)."""
    logp = (z.double() / temperature).log_softmax(-1)
    p = logp.exp()
    return (logp.gather(-1, t[..., None]).squeeze(-1), -(p * logp).sum(-1), (p * p).sum(-1),
            (p * p * logp).sum(-1))


def entropy64(z, temperature=1.0):
    logp = (z.double() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def peaked_logits(n, v, seed=0):
    """Rows from flat to very peaked: a dominant logit of 0..30 over a N(0, 1) floor."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    z[torch.arange(n), torch.randint(0, v, (n,), generator=g)] += torch.linspace(0, 30, n, dtype=torch.float64)
    return z


def close(actual, ref, atol, rtol):
    err = (actual.double() - ref.double()).abs()
    bound = atol + rtol * ref.double().abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3e} (worst ratio {(err / bound).max().item():.2f})"


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk", [None, 3])
def test_logits_head_collision_logp_matches_float64(temperature, chunk):
    z = peaked_logits(17, 50)
    t = torch.randint(0, 50, (17,), generator=torch.Generator().manual_seed(1))
    lp, ent, col, clp = token_logprobs_entropy(z.float(), t, temperature=temperature, chunk_size=chunk,
                                               return_collision=True, return_collision_logp=True)
    r = ref_stats(z.float(), t, temperature)
    for a, b in zip((lp, ent, col, clp), r):
        close(a, b, atol=2e-6, rtol=2e-5)
    # the flag alone returns (logprobs, entropy, collision_logp)
    only = token_logprobs_entropy(z.float(), t, temperature=temperature, return_collision_logp=True)
    assert len(only) == 3 and torch.equal(only[2], clp)
    assert len(token_logprobs_entropy(z.float(), t)) == 2


def test_logits_head_bf16_input():
    z = peaked_logits(12, 40, seed=3).bfloat16()
    t = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(2))
    out = token_logprobs_entropy(z, t, return_collision=True, return_collision_logp=True)
    assert all(o.dtype == torch.float32 for o in out)
    for a, b in zip(out, ref_stats(z.double(), t)):  # the reference sees the same rounded logits
        close(a, b, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("temperature,scale", [(1.0, 1.0), (0.6, 1.0), (1.3, 0.5)])
@pytest.mark.parametrize("vocab_chunk", [None, 7])
def test_lm_head_collision_logp_matches_float64(temperature, scale, vocab_chunk):
    g = torch.Generator().manual_seed(4)
    n, hdim, v = 13, 16, 45
    h = torch.randn(n, hdim, generator=g)
    w = torch.randn(v, hdim, generator=g)
    h[: n // 2] *= 6.0  # peaked rows (large logits): the shift of R across tiles matters
    bias = torch.randn(v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    lp, ent, col, clp = lm_head_logprobs_entropy(h, w, t, bias=bias, temperature=temperature, logit_scale=scale,
                                                 return_collision=True, return_collision_logp=True,
                                                 vocab_chunk=vocab_chunk, chunk_size=5)
    z = (h.double() @ w.double().T + bias.double()) * scale
    for a, b in zip((lp, ent, col, clp), ref_stats(z, t, temperature)):
        close(a, b, atol=3e-6, rtol=3e-5)
    assert (clp <= 0).all()
    # gradients unchanged by the new output
    hh = h.clone().requires_grad_()
    lm_head_logprobs_entropy(hh, w, t, return_collision_logp=True, vocab_chunk=vocab_chunk)[0].sum().backward()
    hh2 = h.clone().requires_grad_()
    lm_head_logprobs_entropy(hh2, w, t, vocab_chunk=vocab_chunk)[0].sum().backward()
    torch.testing.assert_close(hh.grad, hh2.grad, rtol=0, atol=0)


def test_lm_head_bf16_inputs():
    g = torch.Generator().manual_seed(5)
    h = (3 * torch.randn(9, 32, generator=g)).bfloat16()
    w = torch.randn(60, 32, generator=g).bfloat16()
    t = torch.randint(0, 60, (9,), generator=g)
    out = lm_head_logprobs_entropy(h, w, t, return_collision=True, return_collision_logp=True, vocab_chunk=16)
    z = h.double() @ w.double().T  # products of bf16 values are exact in float32 accumulation up to rounding
    for a, b in zip(out, ref_stats(z, t)):
        close(a, b, atol=1e-4, rtol=1e-4)


def test_entropy_change_hand_worked():
    # π = (1/2, 1/4, 1/4), a = 0, A = 1: H = 1.5 ln 2; bracket = p(log p + H) − Σπ²(log π + H)
    pi = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    h = -(pi * pi.log()).sum()
    bracket = 0.5 * (torch.log(torch.tensor(0.5, dtype=torch.float64)) + h) - (pi ** 2 * (pi.log() + h)).sum()
    got = entropy_change_first_order(pi[0].log(), h, (pi ** 2).sum(), (pi ** 2 * pi.log()).sum(), 1.0)
    assert abs(float(got) + float(bracket)) < 1e-15
    # by hand, L = ln 2: p(log p + H) = 0.5·0.5L; Σπ²(log π + H) = 0.25·0.5L + 2·0.0625·(−0.5L) = 0.0625L
    assert abs(float(bracket) - 0.1875 * math.log(2.0)) < 1e-15
    assert abs(float(got) + 0.1875 * math.log(2.0)) < 1e-15


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("adv", [1.0, -0.8])
def test_entropy_change_matches_finite_differences(temperature, adv):
    """Perturb the raw logits by η·A·(e_a − π)/T (the gradient of A log π(a)) and compare H(z')−H(z)."""
    n, v = 24, 30
    z = peaked_logits(n, v, seed=7) * 0.5
    g = torch.Generator().manual_seed(8)
    # sampled tokens: half the dominant token, half a random (often rare) one
    t = torch.where(torch.arange(n) % 2 == 0, (z / temperature).argmax(-1), torch.randint(0, v, (n,), generator=g))
    lp, ent, col, clp = ref_stats(z, t, temperature)
    pi = (z / temperature).softmax(-1)
    grad = adv * (torch.nn.functional.one_hot(t, v).double() - pi) / temperature
    for eta in (1e-4, 1e-5):
        fd = entropy64(z + eta * grad, temperature) - entropy64(z, temperature)
        pred = entropy_change_first_order(lp, ent, col, clp, adv, step_size=eta, temperature=temperature)
        # second-order remainder O(η²); float64 rounding of H ~1e-16 / η
        close(pred, fd, atol=2e-14 / eta + 50 * eta ** 2, rtol=1e-3)


def test_entropy_change_from_head_outputs_sign_spike():
    """A > 0 on a rare token at a confident position raises entropy (the paper's 'spike')."""
    z = torch.full((1, 20), 0.0)
    z[0, 3] = 9.0
    t = torch.tensor([11])
    stats = token_logprobs_entropy(z, t, return_collision=True, return_collision_logp=True)
    up = entropy_change_first_order(*stats, 1.0)
    down = entropy_change_first_order(*stats, -1.0)
    assert float(up) > 0 > float(down)
    # and the float32 head outputs agree with the float64 formula path
    ref = entropy_change_first_order(*ref_stats(z.double(), t), 1.0)
    close(up, ref, atol=1e-7, rtol=1e-4)


def test_entropy_change_bf16_logits_and_advantage_broadcast():
    z = peaked_logits(2 * 5, 25, seed=9).reshape(2, 5, 25)
    t = torch.randint(0, 25, (2, 5), generator=torch.Generator().manual_seed(10))
    zb = z.bfloat16()
    stats = token_logprobs_entropy(zb, t, return_collision=True, return_collision_logp=True)
    adv = torch.tensor([[0.5], [-1.5]])
    got = entropy_change_first_order(*stats, adv)
    ref = entropy_change_first_order(*ref_stats(zb.double(), t), adv.double())
    assert got.shape == (2, 5)
    close(got, ref, atol=1e-6, rtol=1e-4)


def test_entropy_change_bad_temperature():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="temperature"):
        entropy_change_first_order(x, x, x, x, 1.0, temperature=0.0)
