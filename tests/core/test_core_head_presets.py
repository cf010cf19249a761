import pytest
import torch

from stapo.core import PRESETS, get_preset, grad_norm_proxy, token_logprobs_entropy


def ref_head(logits, targets, temperature=1.0):
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(p * logp).sum(-1), (p * p).sum(-1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 3])
def test_logits_head_against_float64(dtype, tol, temperature, chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 50, generator=g) * 4).to(dtype)
    logits[0, 0, 7] = 40.0  # peaked row
    targets = torch.randint(0, 50, (2, 5), generator=g)
    lp, ent, col = token_logprobs_entropy(logits, targets, temperature, chunk_size=chunk, return_collision=True)
    rlp, rent, rcol = ref_head(logits, targets, temperature)  # same (rounded) inputs, float64 math
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lp.double(), rlp, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(col.double(), rcol, atol=tol * 10, rtol=tol)
    assert not ent.requires_grad


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logits_head_gradient(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 13, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 13, (7,), generator=g)
    torch.autograd.gradcheck(
        lambda z: token_logprobs_entropy(z, targets, temperature, chunk_size=2)[0],
        (logits.clone().requires_grad_(),),
    )
    # bf16 logits: gradient in the input dtype, close to the float64 gradient
    w = torch.randn(7, generator=g, dtype=torch.float64)
    zb = logits.bfloat16().requires_grad_()
    (token_logprobs_entropy(zb, targets, temperature, chunk_size=3)[0] * w).sum().backward()
    zr = zb.detach().double().requires_grad_()
    (ref_head(zr, targets, temperature)[0] * w).sum().backward()
    assert zb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(zb.grad.double(), zr.grad, atol=2e-2, rtol=2e-2)


def test_proxy_is_squared_gradient_norm_of_logprob():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 20, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 20, (6,), generator=g)
    lp, _, col = token_logprobs_entropy(z, targets, return_collision=True)
    for i in range(6):
        zi = z[i].clone().requires_grad_()
        torch.log_softmax(zi, -1)[targets[i]].backward()
        assert float(grad_norm_proxy(lp[i], col[i])) == pytest.approx(float((zi.grad**2).sum()), rel=1e-5)


def test_head_errors():
    with pytest.raises(ValueError, match="targets must have shape"):
        token_logprobs_entropy(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be in"):
        token_logprobs_entropy(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs_entropy(torch.zeros(2, 5), torch.tensor([0, 1]), temperature=0)


def test_presets_follow_method():
    assert set(PRESETS) == {"grpo", "dapo", "dr_grpo", "20-entropy", "justrl", "stapo"}
    s, j = get_preset("stapo"), get_preset("justrl")
    # STAPO = JustRL's objective + the S2T mask
    assert (s.clip_low, s.clip_high, s.agg, s.advantage_scale, s.clip_ratio_c) == (
        j.clip_low, j.clip_high, j.agg, j.advantage_scale, j.clip_ratio_c)
    assert (s.token_filter, s.s2t.tau_p, s.s2t.tau_h, s.s2t.tau_h_quantile) == ("s2t", 0.002, None, 0.75)
    # JustRL's public script: clip 0.2 / 0.28, dual clip c = 10
    assert (j.clip_low, j.clip_high, j.clip_ratio_c, j.s2t) == (0.2, 0.28, 10.0, None)
    assert get_preset("grpo").clip_ratio_c is None
    assert get_preset("dapo").clip_high == 0.28
    assert get_preset("dr_grpo").advantage_scale == "none"
    assert get_preset("dr_grpo").agg == "seq-mean-token-sum-norm"
    e = get_preset("20-entropy")
    assert (e.token_filter, e.top_entropy_quantile) == ("high_entropy", 0.2)
    assert get_preset("grpo").token_filter == "none"


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown method 'ppo'.*grpo.*stapo"):
        get_preset("ppo")
