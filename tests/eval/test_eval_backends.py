"""Generation backends: vLLM request construction (no vLLM needed), the seeded sampler, HF batching."""

from __future__ import annotations

import importlib.util

import pytest

from stapo.eval.backends import SampleRequest, choose_backend, vllm_requests
from stapo.eval.protocol import SETTINGS, parse_benchmarks, parse_settings, sample_seed


def _req(seed=1, t=1.0, p=1.0, n=8, prompt=(1, 2, 3)):
    return SampleRequest(prompt_ids=tuple(prompt), temperature=t, top_p=p, max_new_tokens=n, seed=seed)


def test_vllm_requests_one_per_sample_with_own_seed():
    reqs = [_req(seed=11, t=1.0, p=1.0, n=64), _req(seed=12, t=0.7, p=0.9, n=64, prompt=(5, 6))]
    built = vllm_requests(reqs, stop_token_ids=[2])
    assert built[0] == (
        {"prompt_token_ids": [1, 2, 3]},
        {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "max_tokens": 64, "seed": 11,
         "skip_special_tokens": True, "stop_token_ids": [2]},
    )
    assert built[1][0] == {"prompt_token_ids": [5, 6]}
    assert (built[1][1]["temperature"], built[1][1]["top_p"], built[1][1]["seed"]) == (0.7, 0.9, 12)
    assert "stop_token_ids" not in vllm_requests(reqs)[0][1]


@pytest.mark.parametrize("bad,field", [(_req(t=-0.5), "temperature"), (_req(p=0.0), "top_p"), (_req(p=1.5), "top_p"),
                                        (_req(n=0), "max_new_tokens"), (_req(prompt=()), "empty prompt")])
def test_vllm_requests_reject_bad_requests(bad, field):
    with pytest.raises(ValueError, match=field):
        vllm_requests([bad])


def test_sample_seed_is_stable_and_distinct():
    s = sample_seed(0, "aime24", "train", "aime24-2024-I-1", 3)
    assert s == sample_seed(0, "aime24", "train", "aime24-2024-I-1", 3)
    assert 0 <= s < 2**63
    others = {sample_seed(0, "aime24", "train", "aime24-2024-I-1", i) for i in range(32)}
    others |= {sample_seed(1, "aime24", "train", "aime24-2024-I-1", 3),
               sample_seed(0, "aime24", "nucleus", "aime24-2024-I-1", 3)}
    assert len(others) == 34


def test_protocol_parsing():
    assert parse_benchmarks("all") == ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
    assert parse_benchmarks("MATH500, aime24") == ["aime24", "math500"]  # table order
    with pytest.raises(ValueError, match="unknown benchmark 'gsm8k'"):
        parse_benchmarks("math500,gsm8k")
    assert parse_settings("both") == ["train", "nucleus"]
    assert parse_settings("all") == ["train", "nucleus", "greedy"]
    assert parse_settings("greedy") == ["greedy"]
    with pytest.raises(ValueError, match="--setting"):
        parse_settings("top5")
    assert (SETTINGS["train"].temperature, SETTINGS["train"].top_p) == (1.0, 1.0)
    assert (SETTINGS["nucleus"].temperature, SETTINGS["nucleus"].top_p) == (0.7, 0.9)


def test_choose_backend():
    vllm_on_gpu = importlib.util.find_spec("vllm") is not None and __import__("torch").cuda.is_available()
    expected = "vllm" if vllm_on_gpu else "hf"
    assert choose_backend("auto") == expected
    assert choose_backend("hf") == "hf"
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("tgi")


# ------------------------------------------------------------------------------------- seeded sampler

torch = pytest.importorskip("torch")


def _reference_sample(logits_row, temperature, top_p, u, sort=True):
    """float64 reference: sort descending, keep the smallest prefix with mass >= top_p, inverse CDF
    (vocabulary order, no sort, for a row with top_p = 1)."""
    import math

    z = [float(x) / temperature for x in logits_row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    probs = [(p / s, i) for i, p in enumerate(e)]
    if sort:
        probs = sorted(probs, key=lambda t: (-t[0], t[1]))
    kept, mass = [], 0.0
    for p, i in probs:
        if mass >= top_p:
            break
        kept.append((p, i))
        mass += p
    target, acc = u * mass, 0.0
    for p, i in kept:
        acc += p
        if target < acc:
            return i
    return kept[-1][1]


def test_seeded_sampler_matches_float64_reference():
    from stapo.eval.backends import SeededSampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g) * 2
    temps, tops = [1.0, 0.7, 1.0, 0.7, 0.5, 1.3], [1.0, 0.9, 0.5, 0.3, 1.0, 0.95]
    seeds = [101, 102, 103, 104, 105, 106]
    for step in range(20):
        sampler = SeededSampler(seeds, temps, tops)
        for _ in range(step):  # advance each row's stream by `step` draws
            sampler.sample(logits)
        got = sampler.sample(logits).tolist()
        us = []
        for s in seeds:
            gen = torch.Generator().manual_seed(s)
            for _ in range(step + 1):
                u = torch.rand(1, generator=gen, dtype=torch.float64).item()
            us.append(u)
        want = [_reference_sample(logits[i].tolist(), temps[i], tops[i], us[i], sort=tops[i] < 1) for i in range(6)]
        assert got == want
    # top_p = 1 rows use the vocabulary-order CDF whatever the other rows do
    got = SeededSampler(seeds, temps, [1.0] * 6).sample(logits).tolist()
    us = [torch.rand(1, generator=torch.Generator().manual_seed(s), dtype=torch.float64).item() for s in seeds]
    assert got == [_reference_sample(logits[i].tolist(), temps[i], 1.0, us[i], sort=False) for i in range(6)]


def test_seeded_sampler_rows_are_batch_independent_and_nucleus_respected():
    from stapo.eval.backends import SeededSampler

    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    # alone vs. in a batch with other rows: the same draws
    alone = [SeededSampler([7], [1.0], [1.0]).sample(logits).item()]
    batch = SeededSampler([5, 7, 9], [1.0] * 3, [1.0] * 3).sample(logits.repeat(3, 1))
    assert batch[1].item() == alone[0]
    # top_p = 0.5 with p(token0) = 0.66: only token 0 can be drawn
    sampler = SeededSampler(list(range(200)), [1.0] * 200, [0.5] * 200)
    assert set(sampler.sample(logits.repeat(200, 1)).tolist()) == {0}
    # empirical frequencies at T = 1 match softmax (4000 draws, 5-sigma band)
    sampler = SeededSampler(list(range(4000)), [1.0] * 4000, [1.0] * 4000)
    draws = sampler.sample(logits.repeat(4000, 1))
    probs = torch.softmax(logits[0].double(), -1)
    for tok in range(3):
        freq = (draws == tok).double().mean().item()
        sd = (probs[tok] * (1 - probs[tok]) / 4000).sqrt().item()
        assert abs(freq - probs[tok].item()) < 5 * sd + 1e-9


def test_hf_backend_same_samples_whatever_the_batch(tiny_qwen3_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.eval.backends import HFBackend

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir).eval()
    prompts = [tok(text)["input_ids"] for text in ("What is 2+2?", "Hi", "Compute 17 times 3, please.")]
    reqs = [_req(seed=100 + i, prompt=p, n=6) for i, p in enumerate(prompts)]
    reqs.append(_req(seed=200, t=0.7, p=0.9, prompt=prompts[0], n=3))
    batched = HFBackend(model, tok, batch_size=4).generate(reqs)
    single = HFBackend(model, tok, batch_size=1).generate(reqs)
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.finish_reason for c in batched] == [c.finish_reason for c in single]
    assert all(len(c.token_ids) <= r.max_new_tokens for c, r in zip(batched, reqs))
    assert len(batched[3].token_ids) <= 3
    # a different seed gives a different sample (random tiny model: a near-uniform distribution)
    other = HFBackend(model, tok, batch_size=4).generate([_req(seed=999, prompt=prompts[0], n=6)])
    assert other[0].token_ids != batched[0].token_ids
    assert batched[0].text == tok.decode(list(batched[0].token_ids), skip_special_tokens=True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (GPU machines only)")
def test_vllm_backend_generates(tiny_qwen3_dir):
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from transformers import AutoTokenizer

    from stapo.eval.backends import VLLMBackend

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    backend = VLLMBackend(str(tiny_qwen3_dir), tok, dtype="float32", gpu_memory_utilization=0.3, max_model_len=256)
    reqs = [_req(seed=1, prompt=tok("Hi")["input_ids"], n=5), _req(seed=1, prompt=tok("Hi")["input_ids"], n=5)]
    out = backend.generate(reqs)
    assert len(out) == 2 and all(1 <= len(c.token_ids) <= 5 for c in out)
    assert out[0].token_ids == out[1].token_ids  # same seed, same prompt -> same sample
