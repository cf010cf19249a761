"""`stapo.analyze` token statistics: float64 references on a tiny model, autograd gradient norms,
hand-worked S2T sets and sweeps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stapo.analyze.tokens import (
    TokenBatch,
    format_summary,
    format_sweep,
    summarize,
    threshold_sweep,
)
from stapo.core import S2TSettings, grad_norm_proxy, s2t_mask, tau_h_for_fraction, token_logprobs_entropy
from stapo.data.rollouts import rollouts_from_records

# The quantile over all valid tokens, uncapped (the literal reading): what these references compute.
LITERAL = dict(tau_h_population="valid", tau_h_max=math.inf)
PROMPTS = ["What is 1 + 1?", "Compute 2 + 3, please."]
GROUP = 3


def _fake_grade(completions, golds):
    # deterministic, depends on the text, gives both outcomes in practice
    return [float(len(c) % 2) for c in completions]


@pytest.fixture(scope="module")
def tiny(tiny_qwen3_dir):
    import transformers

    torch.set_num_threads(1)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # sharper distributions (random init is near uniform): varied p and H
        model.model.norm.weight.mul_(20.0)
    return model, tok


@pytest.fixture(scope="module")
def scored(tiny):
    from stapo.analyze.collect import collect_rollouts

    model, tok = tiny
    for seed in (2, 1, 0, 3, 4):  # a seed whose groups have reward variance (non-zero advantages)
        ro = collect_rollouts(model, tok, PROMPTS, ["2", "5"], group_size=GROUP, max_new_tokens=6,
                              s2t=S2TSettings(tau_p=0.5, tau_h_quantile=0.5, **LITERAL), seed=seed,
                              grade=_fake_grade, progress=False, rows_per_pass=4)  # 2 scoring passes
        if (ro.advantage > 0).any() and ro.s2t.any():
            return ro
    pytest.fail("no seed gave positive advantages and S2T tokens")


def _reference_float64(model, tok, ro, i):
    """Full-distribution float64 statistics of sample i, from an unpadded float64 forward pass."""
    prompt_ids = tok(ro.prompt[i], add_special_tokens=False)["input_ids"]
    sl = ro.token_slice(i)
    comp = ro.token_id[sl].tolist()
    ids = torch.tensor([prompt_ids + comp])
    m64 = _double(model)
    with torch.no_grad():
        logits = m64(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double()
    return logits, torch.tensor(comp)


_DOUBLE = {}


def _double(model):
    if id(model) not in _DOUBLE:
        import copy

        _DOUBLE[id(model)] = copy.deepcopy(model).double().eval()
    return _DOUBLE[id(model)]


def test_stats_match_float64_full_distribution(tiny, scored):
    model, tok = tiny
    ro = scored
    assert ro.num_samples == len(PROMPTS) * GROUP
    for i in range(ro.num_samples):
        logits, comp = _reference_float64(model, tok, ro, i)
        probs = torch.softmax(logits, -1)
        p = probs[torch.arange(len(comp)), comp]
        ent = -(probs * torch.log_softmax(logits, -1)).sum(-1)
        col = (probs * probs).sum(-1)
        sl = ro.token_slice(i)
        np.testing.assert_allclose(ro.logprob[sl], p.log().numpy(), atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(ro.entropy[sl], ent.numpy(), atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(ro.collision[sl], col.numpy(), atol=2e-5, rtol=1e-4)
    # the distributions are far from uniform, so this comparison says something
    assert ro.entropy.max() > ro.entropy.min() + 1.0 and ro.entropy.min() < 8.0


def test_rewards_advantages_and_flags(scored):
    ro = scored
    assert ro.reward.tolist() == _fake_grade(ro.completion, None)
    r = ro.reward.astype(np.float64).reshape(-1, GROUP)
    std = r.std(axis=1, ddof=1, keepdims=True)
    expected = np.where(std > 0, (r - r.mean(1, keepdims=True)) / (std + 1e-6), 0.0).reshape(-1)
    np.testing.assert_allclose(ro.advantage, expected, atol=1e-5)
    # the stored S2T flags: A > 0, p < 0.5, H below the median entropy of all tokens
    adv = np.repeat(ro.advantage, ro.lengths())
    median = np.quantile(ro.entropy.astype(np.float64), 0.5)
    expected_flags = (adv > 0) & (np.exp(ro.logprob) < 0.5) & (ro.entropy < median)
    np.testing.assert_array_equal(ro.s2t, expected_flags)


def test_completion_ends_at_first_eos():
    from stapo.analyze.collect import completion_lengths

    ids = torch.tensor([[5, 7, 2, 9, 2], [5, 7, 8, 9, 4], [2, 0, 0, 0, 0]])
    assert completion_lengths(ids, [2]).tolist() == [3, 5, 1]
    assert completion_lengths(ids, [9, 2]).tolist() == [3, 4, 1]


def test_proxy_equals_autograd_gradient_norm(tiny, scored):
    model, tok = tiny
    ro = scored
    for i in range(ro.num_samples):
        logits, comp = _reference_float64(model, tok, ro, i)
        z = logits.clone().requires_grad_(True)
        # rows are independent: the gradient of the sum is each row's ∇_z log π(a_t)
        torch.log_softmax(z, -1)[torch.arange(len(comp)), comp].sum().backward()
        true_norm2 = (z.grad**2).sum(-1).numpy()
        np.testing.assert_allclose(ro.grad_proxy[ro.token_slice(i)], true_norm2, atol=5e-5)


def test_proxy_hand_worked_spurious_token():
    # logits [10, 0, 0], sampled token 1: p = 1/(e^10+2), mass on token 0 -> proxy close to 2
    z = torch.tensor([[10.0, 0.0, 0.0]], dtype=torch.float64)
    e10 = math.exp(10)
    p = 1 / (e10 + 2)
    collision = (e10 / (e10 + 2)) ** 2 + 2 * p**2
    expected = 1 - 2 * p + collision  # = 1.99973...
    assert expected == pytest.approx(1.9997276, abs=1e-6)
    lp, _, col = token_logprobs_entropy(z.float(), torch.tensor([1]), return_collision=True)
    assert float(grad_norm_proxy(lp, col)[0]) == pytest.approx(expected, abs=1e-5)
    zz = z.clone().requires_grad_(True)
    torch.log_softmax(zz, -1)[0, 1].backward()
    assert float((zz.grad**2).sum()) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------- hand-worked S2T sets

# 10 tokens in 3 samples: (p, H) per token; advantages per sample
HAND = [
    (1.0, [(0.005, 0.01), (0.5, 0.01), (0.008, 0.3), (0.9, 2.0)]),  # tokens 0..3
    (-1.0, [(0.001, 0.001), (0.3, 1.0)]),  # A < 0: never spurious
    (0.5, [(0.02, 0.05), (0.0005, 0.002), (0.6, 0.7), (0.004, 0.9)]),  # tokens 6..9
]


def _hand_rollouts():
    recs = []
    for adv, toks in HAND:
        n = len(toks)
        recs.append({
            "prompt": "q", "completion": "c", "reward": float(adv > 0), "advantage": adv,
            "token_id": list(range(n)), "token_text": [f"t{k}" for k in range(n)],
            "logprob": [math.log(p) for p, _ in toks], "entropy": [h for _, h in toks],
            # collision: any value in (p², 1]; chosen so that the proxy is easy to write down
            "collision": [0.5] * n, "s2t": [False] * n,
        })
    return rollouts_from_records(recs)


def test_summary_hand_worked():
    ro = _hand_rollouts()
    s = summarize(ro, S2TSettings(tau_p=0.01, tau_h=0.5))
    # A > 0, p < 0.01, H < 0.5: token 0 (0.005, 0.01), 2 (0.008, 0.3), 7 (0.0005, 0.002)
    assert s.count_s2t == 3 and s.frac_s2t == pytest.approx(0.3)
    assert s.count_low_prob == 5  # tokens 0, 2, 4, 7, 9
    assert s.count_low_entropy == 6  # tokens 0, 1, 2, 4, 6, 7
    assert s.count_low_prob_low_entropy == 4  # 0, 2, 4 (A<0), 7
    assert (s.tokens_pos_adv, s.tokens_neg_adv, s.tokens_zero_adv) == (8, 2, 0)
    proxies = [1 - 2 * p + 0.5 for _, toks in HAND for p, _ in toks]
    s2t_sum = proxies[0] + proxies[2] + proxies[7]
    assert s.grad_share_s2t == pytest.approx(s2t_sum / sum(proxies), rel=1e-6)
    adv2 = [a * a for a, toks in HAND for _ in toks]
    wsum = sum(g * w for g, w in zip(proxies, adv2))
    w_s2t = proxies[0] * 1 + proxies[2] * 1 + proxies[7] * 0.25
    assert s.grad_share_s2t_adv_weighted == pytest.approx(w_s2t / wsum, rel=1e-6)
    assert s.grad_proxy_mean_s2t == pytest.approx(s2t_sum / 3, rel=1e-6)
    text = format_summary(s)
    assert "S2T set (A>0 too):          3" in text


def test_summary_mask_is_core_s2t_mask():
    ro = _hand_rollouts()
    tb = TokenBatch(ro)
    pad = ro.padded()
    for th in (S2TSettings(0.01, 0.5), S2TSettings(0.05, None, 0.5), S2TSettings(0.001, None, 0.05),
               S2TSettings(0.05, None, 0.5, "valid"), S2TSettings(0.05, None, 0.5, "low_prob", 0.3)):
        core = s2t_mask(pad["logprobs"], pad["entropy"], pad["advantages"], pad["response_mask"],
                        settings=S2TSettings.resolve(tau_p=th.tau_p, tau_h=th.tau_h, tau_h_quantile=th.tau_h_quantile,
                                                     tau_h_population=th.tau_h_population, tau_h_max=th.tau_h_max))
        assert tb.mask(th).tolist() == core[pad["response_mask"]].tolist()
        assert summarize(tb, th).count_s2t == int(core.sum())


def test_sweep_hand_cells_and_monotone():
    ro = _hand_rollouts()
    sw = threshold_sweep(ro, tau_p=(0.001, 0.01, 0.1), tau_h_quantiles=(0.1, 0.5), tau_h_absolute=(0.01, 0.5, 1.0))
    # tau_p 0.001: only token 7 (p 0.0005, H 0.002) -> needs tau_h > 0.002
    assert sw.cell("0.01", 0.001).count == 1
    assert sw.cell("0.01", 0.01).count == 1  # token 0 has H = 0.01, not < 0.01 (strict)
    assert sw.cell("0.01", 0.01).frac == pytest.approx(0.1)
    assert sw.cell("0.5", 0.01).count == 3  # tokens 0, 2, 7
    assert sw.cell("1", 0.1).count == 5  # + token 6 (0.02, 0.05), token 9 (0.004, 0.9)
    # quantile rows: sorted entropies 0.001 0.002 0.01 0.01 0.05 | 0.3 0.7 0.9 1.0 2.0; the 0.5
    # quantile (linear, position 4.5) is (0.05 + 0.3) / 2 = 0.175 -> tokens 0 (H 0.01) and 7 (H 0.002)
    assert sw.cell("q0.5", 0.01).tau_h == pytest.approx(0.175)
    assert sw.cell("q0.5", 0.01).count == 2
    _check_monotone(sw)


def _check_monotone(sw):
    for label in sw.tau_h_labels:  # more tau_p -> superset
        counts = [sw.cell(label, p).count for p in sw.tau_p]
        shares = [sw.cell(label, p).grad_share for p in sw.tau_p]
        assert counts == sorted(counts) and shares == sorted(shares)
    quantiles = [lb for lb in sw.tau_h_labels if lb.startswith("q")]
    for group in (quantiles, [lb for lb in sw.tau_h_labels if lb not in quantiles]):
        for p in sw.tau_p:  # more tau_h -> superset
            counts = [sw.cell(lb, p).count for lb in group]
            fracs = [sw.cell(lb, p).frac for lb in group]
            assert counts == sorted(counts) and fracs == sorted(fracs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sweep_monotone_random(seed):
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(12):
        n = int(rng.integers(1, 30))
        logits = rng.normal(0, 4, (n, 50))
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        a = rng.integers(0, 50, n)
        recs.append({
            "prompt": "q", "completion": "c", "reward": 0.0, "advantage": float(rng.normal()),
            "token_id": a, "token_text": ["x"] * n, "logprob": np.log(probs[np.arange(n), a]),
            "entropy": -(probs * np.log(probs)).sum(1), "collision": (probs**2).sum(1), "s2t": [False] * n,
        })
    sw = threshold_sweep(rollouts_from_records(recs))
    _check_monotone(sw)
    assert "tau_h \\ tau_p" in format_sweep(sw)


def test_tau_h_for_fraction_hand_worked():
    tb = TokenBatch(_hand_rollouts())
    # candidates at tau_p 0.01 (A>0, p<0.01): tokens 0, 2, 7, 9 with entropies 0.01, 0.3, 0.002, 0.9
    candidates = tb.decision(S2TSettings(tau_p=0.01)).candidates
    tau_h = tau_h_for_fraction(tb.entropy, candidates, 10, 0.2)  # k = 2 of 10 tokens -> just above 0.01
    assert int(candidates.sum()) == 4
    assert 0.01 < tau_h < 0.0100001
    assert summarize(tb, S2TSettings(tau_p=0.01, tau_h=tau_h)).count_s2t == 2
    assert summarize(tb, S2TSettings(tau_p=0.01, tau_h=0.01)).count_s2t == 1  # strict H < tau_h
    assert tau_h_for_fraction(tb.entropy, candidates, 10, 0.5) is None  # needs 5 of only 4 candidates
    s = summarize(tb, S2TSettings(tau_p=0.01, tau_h=0.01))
    assert s.paper_fraction_reachable and s.max_frac_at_tau_p == pytest.approx(0.4)


def test_no_tokens_is_an_error():
    ro = rollouts_from_records([{
        "prompt": "q", "completion": "", "advantage": 0.0, "token_id": [], "token_text": [],
        "logprob": [], "entropy": [], "collision": [], "s2t": [],
    }])
    with pytest.raises(ValueError, match="no completion tokens"):
        TokenBatch(ro)


# ------------------------------------------------------------------ first-order entropy change ΔH


def test_entropy_change_collected_matches_float64_and_groups(tiny):
    from stapo.analyze.collect import collect_rollouts

    model, tok = tiny
    ro, clp = collect_rollouts(model, tok, PROMPTS, ["2", "5"], group_size=GROUP, max_new_tokens=6,
                               s2t=S2TSettings(tau_p=0.5, tau_h_quantile=0.5, **LITERAL), seed=2, grade=_fake_grade,
                               progress=False,
                               return_collision_logp=True)
    assert clp.shape == (ro.num_tokens,) and clp.dtype == np.float32
    tb = TokenBatch(ro, collision_logp=clp)
    for i in range(ro.num_samples):
        logits, comp = _reference_float64(model, tok, ro, i)
        logp = torch.log_softmax(logits, -1)
        pi = logp.exp()
        h = -(pi * logp).sum(-1)
        a = comp
        p = pi[torch.arange(len(a)), a]
        ref = -float(ro.advantage[i]) * (p * (p.log() + h) - (pi * pi * (logp + h[:, None])).sum(-1))
        np.testing.assert_allclose(tb.delta_h[ro.token_slice(i)].numpy(), ref.numpy(), atol=2e-4, rtol=2e-3)
    mask = tb.mask(S2TSettings(tau_p=0.5, tau_h_quantile=0.5, **LITERAL))
    groups = tb.entropy_change_groups(mask)
    dh = tb.delta_h
    total = float(dh.abs().sum())
    assert groups["all"]["share_abs"] == pytest.approx(1.0)
    assert groups["s2t"]["share_signed"] + groups["other"]["share_signed"] == pytest.approx(
        groups["all"]["share_signed"])
    assert groups["s2t"]["sum"] == pytest.approx(float(dh[mask].sum()))
    assert groups["pos_adv"]["share_abs"] == pytest.approx(float(dh[tb.adv_flat > 0].abs().sum()) / total)
    assert groups["neg_adv"]["count"] == int((tb.adv_flat < 0).sum())
    s = summarize(tb, S2TSettings(tau_p=0.5, tau_h_quantile=0.5, **LITERAL))
    assert s.entropy_change == groups
    assert "mean dH/eta" in format_summary(s)


def test_entropy_change_hand_worked_groups():
    """Two tokens, ΔH by hand from (p, H, Σπ², Σπ² log π) of explicit distributions."""
    dists = [[0.9, 0.05, 0.05], [0.5, 0.25, 0.25]]
    recs, clp = [], []
    for adv, (dist, a) in zip((1.0, -1.0), ((dists[0], 1), (dists[1], 0))):
        pi = np.array(dist)
        recs.append({"prompt": "q", "completion": "c", "reward": float(adv > 0), "advantage": adv,
                     "token_id": [a], "token_text": ["t"], "logprob": [math.log(pi[a])],
                     "entropy": [float(-(pi * np.log(pi)).sum())], "collision": [float((pi ** 2).sum())],
                     "s2t": [False]})
        clp.append(float((pi ** 2 * np.log(pi)).sum()))
    tb = TokenBatch(rollouts_from_records(recs), collision_logp=np.array(clp, dtype=np.float32))
    expect = []
    for adv, (dist, a) in zip((1.0, -1.0), ((dists[0], 1), (dists[1], 0))):
        pi = np.array(dist)
        h = -(pi * np.log(pi)).sum()
        expect.append(-adv * (pi[a] * (np.log(pi[a]) + h) - (pi ** 2 * (np.log(pi) + h)).sum()))
    np.testing.assert_allclose(tb.delta_h.numpy(), expect, rtol=1e-5)
    assert expect[0] > 0  # A > 0 on the rare token of a confident row raises the entropy
    g = tb.entropy_change_groups(torch.tensor([True, False]))
    tot = abs(expect[0]) + abs(expect[1])
    assert g["s2t"]["share_signed"] == pytest.approx(expect[0] / tot, rel=1e-5)
    assert g["neg_adv"]["share_signed"] == pytest.approx(expect[1] / tot, rel=1e-5)
    assert g["all"]["mean"] == pytest.approx(sum(expect) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="collision_logp"):
        TokenBatch(rollouts_from_records(recs), collision_logp=np.zeros(3))


def test_entropy_change_absent_for_captured_rollouts():
    s = summarize(_hand_rollouts(), S2TSettings(tau_p=0.01, tau_h=0.5))
    assert s.entropy_change is None
    assert "dH: n/a" in format_summary(s)


def test_completions_cut_at_the_token_limit_are_counted_and_said(tiny, scored):
    """A sample that ends without an end-of-sequence token stopped at --max-new-tokens: the collection
    records how many did, and the printed summary says it."""
    from stapo.analyze.populations import population_table
    from stapo.analyze.tokens import format_console

    model, tok = tiny
    eos = {tok.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or [])} - {None}
    meta = scored.metadata[0]
    lengths = scored.lengths()
    cut = [i for i in range(scored.num_samples) if int(scored.token_id[scored.token_slice(i)][-1]) not in eos]
    assert meta["max_new_tokens"] == 6 and meta["truncated"] == len(cut) > 0
    assert all(lengths[i] == 6 for i in cut)
    th = S2TSettings(tau_p=0.5, tau_h_quantile=0.5, **LITERAL)
    tb = TokenBatch(scored)
    text = format_console(summarize(tb, th), threshold_sweep(tb, applied=th), population_table(tb, 0.5),
                          truncated=(meta["truncated"], meta["max_new_tokens"]))
    assert f"{len(cut)} of {scored.num_samples} cut at the 6-token limit" in text.splitlines()[0]


def test_default_budget_fits_the_readme_command():
    """The README's `stapo analyze tokens` command relies on the default completion budget. Measured on
    its setting (the embedded model, boxed template, T = 1; docs/analyze.md): the completions that end do
    so within 8-491 tokens, and the old budget of 64 cut two in three of them."""
    import shlex
    from pathlib import Path

    from stapo.cli import build_parser
    from stapo.commands.analyze import resolve_tokens_defaults

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("stapo analyze tokens"))
    args = build_parser().parse_args(shlex.split(command.split("#")[0])[1:])
    resolve_tokens_defaults(args)
    assert args.template == "boxed" and args.max_new_tokens >= 491
