"""lm_head_logprobs_entropy against naive float64 recomputations, plus the HF-model helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stapo.core.head import token_logprobs_entropy
from stapo.core.lm_head import (
    BACKEND_ENV,
    causal_lm_head_params,
    causal_lm_hidden_states,
    lm_head_logprobs_entropy,
    resolve_backend,
)

torch.set_num_threads(1)
SRC = Path(__file__).resolve().parents[2] / "src"


def reference(h, w, t, bias=None, temperature=1.0, logit_scale=1.0):
    """Naive float64: full logits, log_softmax, gather."""
    z = h.double() @ w.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale / temperature
    logp = z.log_softmax(-1)
    p = logp.exp()
    return logp.gather(-1, t[..., None]).squeeze(-1), -(p * logp).sum(-1), (p * p).sum(-1)


def close(actual, ref, rtol):
    """|err| <= rtol * max(|ref|, 1): relative for values >= 1, absolute below (entropies near 0)."""
    err = (actual.double() - ref.double()).abs()
    bound = rtol * ref.double().abs().clamp(min=1.0)
    assert bool((err <= bound).all()), f"max err {err.max().item():.3e} (worst ratio {(err / bound).max().item():.2f})"


def normwise(actual, ref, rtol):
    err = (actual.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rtol * scale, f"max err {err:.3e} vs scale {scale:.3e}"


def make(n, h, v, seed=0, logit_std=3.0, peaked=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (logit_std / h**0.5)
    t = torch.randint(0, v, (n,), generator=g)
    if peaked:
        # Real-model-like: a few tokens dominate (large logits), the target is often the argmax,
        # sometimes a very unlikely token (log-prob in the tens).
        top = torch.randint(0, v, (n,), generator=g)
        w[top] += hid * (25.0 / h)  # boosts the logit of `top` by ~25·|h|²/h ≈ 25
        t = torch.where(torch.rand(n, generator=g) < 0.7, top, t)
    return hid.to(dtype), w.to(dtype), t


def run_both(h, w, t, g, **kw):
    """(logprobs, entropy, collision, grads) from ours and from the float64 reference."""
    bias = kw.pop("bias", None)
    temperature, logit_scale = kw.get("temperature", 1.0), kw.get("logit_scale", 1.0)
    leaves = [x.detach().clone().requires_grad_() for x in (h, w) + ((bias,) if bias is not None else ())]
    lp, ent, col = lm_head_logprobs_entropy(
        leaves[0], leaves[1], t, bias=leaves[2] if bias is not None else None, return_collision=True, **kw
    )
    (lp * g).sum().backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    rl, re, rc = reference(
        ref_leaves[0], ref_leaves[1], t, ref_leaves[2] if bias is not None else None, temperature, logit_scale
    )
    (rl * g.double()).sum().backward()
    return (lp, ent, col, [x.grad for x in leaves]), (rl, re, rc, [x.grad for x in ref_leaves])


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6, logit_scale=1.7),
    dict(temperature=1.3, bias=True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("peaked", [False, True])
def test_matches_float64_fp32_inputs(case, peaked):
    case = dict(case)
    h, w, t = make(50, 24, 700, seed=1, peaked=peaked)
    if case.pop("bias", False):
        case["bias"] = torch.randn(700, generator=torch.Generator().manual_seed(5))
    g = torch.randn(50, generator=torch.Generator().manual_seed(2))
    # 50 rows in chunks of 16, 700 columns in tiles of 128: ragged last row chunk and vocab tile.
    (lp, ent, col, grads), (rl, re, rc, rgrads) = run_both(h, w, t, g, chunk_size=16, vocab_chunk=128, **case)
    assert lp.dtype == ent.dtype == col.dtype == torch.float32
    close(lp, rl, 1e-5)
    close(ent, re, 1e-5)
    close(col, rc, 1e-5)
    for a, r in zip(grads, rgrads):
        normwise(a, r, 1e-5)
    if peaked:  # the case really is peaked: some near-deterministic rows, some very unlikely targets
        assert float(re.detach().min()) < 1e-3 and float(rl.detach().min()) < -10


def test_large_logits_do_not_overflow():
    # Logits around ±300 overflow a naive exp in float32; the online softmax must not.
    h, w, t = make(20, 16, 300, seed=3, logit_std=100.0)
    g = torch.ones(20)
    (lp, ent, col, grads), (rl, re, rc, rgrads) = run_both(h, w, t, g, chunk_size=7, vocab_chunk=64)
    assert float(rl.detach().abs().max()) > 100
    assert bool(torch.isfinite(lp).all() and torch.isfinite(ent).all())
    close(lp, rl, 1e-5)
    close(ent, re, 1e-5)
    for a, r in zip(grads, rgrads):
        normwise(a, r, 1e-5)


def test_hand_worked_case():
    # h = [1, 0], W rows e0, e1, 0 → z = [1, 0, 0]: S = e + 2, logprob(0) = 1 − log(e + 2).
    e = torch.e
    h = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    lp, ent, col = lm_head_logprobs_entropy(h, w, torch.tensor([0]), return_collision=True, vocab_chunk=2)
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    assert lp.item() == pytest.approx(1 - torch.log(torch.tensor(e + 2)).item(), rel=1e-6)
    assert ent.item() == pytest.approx(-sum(pi * torch.log(torch.tensor(pi)).item() for pi in p), rel=1e-6)
    assert col.item() == pytest.approx(sum(pi * pi for pi in p), rel=1e-6)


def test_bf16_inputs_bf16_level():
    h, w, t = make(40, 32, 500, seed=4, dtype=torch.bfloat16)
    g = torch.randn(40, generator=torch.Generator().manual_seed(6))
    (lp, ent, col, grads), (rl, re, rc, rgrads) = run_both(h, w, t, g, temperature=0.8, vocab_chunk=96)
    close(lp, rl, 1e-2)
    close(ent, re, 1e-2)
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    for a, r in zip(grads, rgrads):
        normwise(a, r, 2e-2)


def test_autocast_runs_gemm_in_autocast_dtype():
    # fp32 inputs under bf16 autocast: results are those of the bf16-rounded inputs, in float32.
    h, w, t = make(30, 32, 400, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = lm_head_logprobs_entropy(h, w, t, vocab_chunk=128)
    rl, re, _ = reference(h.bfloat16(), w.bfloat16(), t)
    exact, _, _ = reference(h, w, t)
    close(lp, rl, 1e-5)
    close(ent, re, 1e-5)
    assert float((rl - exact).abs().max()) > 1e-3  # the check above can tell the two apart


def test_leading_dims_and_default_tiles_match_flat():
    h, w, t = make(24, 16, 300, seed=8)
    lp, ent = lm_head_logprobs_entropy(h.view(4, 6, 16), w, t.view(4, 6))
    lp2, ent2 = lm_head_logprobs_entropy(h, w, t, chunk_size=5, vocab_chunk=37)
    assert lp.shape == ent.shape == (4, 6)
    torch.testing.assert_close(lp.reshape(-1), lp2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.reshape(-1), ent2, rtol=1e-6, atol=1e-6)


def test_agrees_with_logits_head():
    h, w, t = make(33, 16, 257, seed=9)
    lp, ent, col = lm_head_logprobs_entropy(h, w, t, temperature=0.7, return_collision=True, vocab_chunk=50)
    lp2, ent2, col2 = token_logprobs_entropy(h @ w.T, t, temperature=0.7, return_collision=True)
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col, col2, rtol=1e-5, atol=1e-5)


def test_entropy_detached_and_frozen_weight():
    h, w, t = make(10, 8, 50, seed=10)
    h.requires_grad_()
    lp, ent, col = lm_head_logprobs_entropy(h, w, t, return_collision=True)
    assert lp.requires_grad and not ent.requires_grad and not col.requires_grad
    lp.sum().backward()
    assert h.grad is not None and w.grad is None
    hd = h.detach().double().requires_grad_()
    reference(hd, w, t)[0].sum().backward()
    normwise(h.grad, hd.grad, 1e-5)


class _MaxAlloc(TorchDispatchMode):
    """Largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.max_numel = max(self.max_numel, x.numel())
        return out


def test_never_materialises_n_by_v():
    n, hdim, v = 256, 8, 2000
    h, w, t = make(n, hdim, v, seed=11)
    h.requires_grad_()
    w.requires_grad_()
    with _MaxAlloc() as spy:
        lp, ent = lm_head_logprobs_entropy(h, w, t, chunk_size=64, vocab_chunk=256)
        lp.sum().backward()
    assert spy.max_numel <= max(64 * 256, v * hdim) < n * v // 8
    with _MaxAlloc() as naive:  # the spy does see a full-logits path
        reference(h, w, t)
    assert naive.max_numel >= n * v


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(targets=torch.tensor([0, 9])), "targets"),
        (dict(targets=torch.tensor([0])), "targets"),
        (dict(targets=torch.tensor([0.0, 1.0])), "targets"),
        (dict(temperature=0.0), "temperature"),
        (dict(logit_scale=float("inf")), "logit_scale"),
        (dict(bias=torch.zeros(3)), "bias"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(vocab_chunk=0), "vocab_chunk"),
        (dict(backend="cuda"), "backend"),
        (dict(weight=torch.zeros(5, 3)), "H"),
        (dict(hidden=torch.tensor([[float("nan"), 0.0, 0.0, 0.0]] * 2)), "finite"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    args = dict(hidden=torch.zeros(2, 4), weight=torch.zeros(5, 4), targets=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        lm_head_logprobs_entropy(**args)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve_backend("auto", cpu)
    lm_head_triton = pytest.importorskip("stapo.core.lm_head_triton")
    if lm_head_triton.AVAILABLE and not lm_head_triton.INTERPRET:
        for name in ("triton", "triton-gemm"):
            with pytest.raises(ValueError, match="CUDA"):
                resolve_backend(name, cpu)


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from stapo.core.lm_head import lm_head_logprobs_entropy
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 40, 2300   # 3 vocab tiles of 1000, 3 row chunks of 16, 3 K-steps of 16 (all ragged)
    hid = torch.randn(n, h, generator=g); w = torch.randn(v, h, generator=g) * 0.8
    bias = torch.randn(v, generator=g); t = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)
    out = {}
    for backend in ("triton", "triton-gemm", "torch"):
        leaves = [x.clone().requires_grad_() for x in (hid, w, bias)]
        lp, ent, col = lm_head_logprobs_entropy(leaves[0], leaves[1], t, bias=leaves[2], temperature=0.7,
            logit_scale=1.1, chunk_size=16, vocab_chunk=1000, return_collision=True, backend=backend)
        (lp * up).sum().backward()
        out[backend] = [lp, ent, col] + [x.grad for x in leaves]
    ld = [x.double().requires_grad_() for x in (hid, w, bias)]
    z = ((ld[0] @ ld[1].T + ld[2]) * 1.1 / 0.7).log_softmax(-1)
    ref_lp = z.gather(1, t[:, None]).squeeze(1)
    (ref_lp * up.double()).sum().backward()
    p = z.exp()
    ref = [ref_lp, -(p * z).sum(-1), (p * p).sum(-1)] + [x.grad for x in ld]
    worst = 0.0
    for backend in ("triton", "triton-gemm"):
        for a, b, r in zip(out[backend], out["torch"], ref):
            worst = max(worst, ((a.double() - r.detach()).abs().max() / r.detach().abs().max().clamp(min=1)).item())
            scale = float(b.abs().max().clamp(min=1))  # float32 GEMMs summing in different orders
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * scale), (backend, (a - b).abs().max())
    assert worst < 1e-5, worst
    # bf16 inputs (float32 accumulation): the GEMM-epilogue kernels against the PyTorch passes
    hb, wb = hid[:20].bfloat16(), w[:300].bfloat16()
    tb = t[:20] % 300
    got = {}
    for backend in ("triton-gemm", "torch"):
        leaves = [hb.clone().requires_grad_(), wb.clone().requires_grad_()]
        lp, ent = lm_head_logprobs_entropy(leaves[0], leaves[1], tb, vocab_chunk=128, backend=backend)
        (lp * up[:20]).sum().backward()
        got[backend] = [lp, ent] + [x.grad.float() for x in leaves]
    for a, b in zip(got["triton-gemm"], got["torch"]):
        scale = float(b.abs().max().clamp(min=1))
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * scale), (a - b).abs().max()
    print("TRITON_OK", worst)
    """
)


def test_triton_kernels_interpreted_on_cpu():
    pytest.importorskip("triton", reason="triton not installed: the CUDA kernel path cannot be checked")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))
    env.pop(BACKEND_ENV, None)
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "TRITON_OK" in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------------
# Hugging Face causal LMs
# ------------------------------------------------------------------------------------------------


def _tiny_qwen3(tie: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_hf_model_hidden_states_and_head_match_logits(tie):
    model = _tiny_qwen3(tie)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    params = causal_lm_head_params(model)
    assert params.logit_scale == 1.0 and params.bias is None
    assert (params.weight is model.model.embed_tokens.weight) == tie
    hidden = causal_lm_hidden_states(model, ids, attention_mask=torch.ones_like(ids))
    targets = ids[:, 1:]
    lp, ent = lm_head_logprobs_entropy(hidden[:, :-1], params.weight, targets, temperature=0.9, vocab_chunk=64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double() / 0.9
    logp = logits.log_softmax(-1)
    close(lp, logp.gather(-1, targets[..., None]).squeeze(-1), 1e-5)
    close(ent, -(logp.exp() * logp).sum(-1), 1e-5)
    lp.sum().backward()  # gradient reaches the backbone and the (possibly tied) head
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None and params.weight.grad is not None


def _fake_lm(**cfg):
    head = torch.nn.Linear(4, 6, bias=cfg.pop("bias", False))
    cfg.setdefault("model_type", "fake")
    return SimpleNamespace(config=SimpleNamespace(**cfg), get_output_embeddings=lambda: head, head=head)


def test_head_params_logit_scaling_and_softcap():
    assert causal_lm_head_params(_fake_lm(logit_scale=0.25)).logit_scale == 0.25  # Cohere multiplies
    assert causal_lm_head_params(_fake_lm(logits_scaling=8.0)).logit_scale == 0.125  # Granite divides
    assert causal_lm_head_params(_fake_lm(lm_head_multiplier=2.0)).logit_scale == 2.0  # Falcon-H1
    fake = _fake_lm(bias=True)
    assert causal_lm_head_params(fake).bias is fake.head.bias
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_head_params(_fake_lm(final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="config"):
        causal_lm_head_params(SimpleNamespace())


# ------------------------------------------------------------------------------------------------
# TRL 1.16's own fused head, as a peer reference and as the slot the adapter fills
# ------------------------------------------------------------------------------------------------


def test_adapter_matches_trl_chunked_logprob_function():
    trl_kernels = pytest.importorskip("trl.kernels")
    from stapo.engines.trl.lm_head import TRLChunkedLogProbAdapter

    h, w, t = make(40, 16, 500, seed=12)
    bias = torch.randn(500, generator=torch.Generator().manual_seed(13))
    g = torch.randn(40, generator=torch.Generator().manual_seed(14))
    outs, grads = [], []
    for fn in (trl_kernels.ChunkedLogProbFunction, TRLChunkedLogProbAdapter):
        leaves = [x.clone().requires_grad_() for x in (h, w, bias)]
        res = fn.apply(*leaves, t, 0.8, 128, None, 1.5, ("log_probs", "entropy", "log_sum_sq_probs"))
        assert res[3] is None and res[4] is None
        (res[0] * g).sum().backward()
        outs.append([x.detach() for x in res[:3]])
        grads.append([x.grad for x in leaves])
    for a, b in zip(outs[1] + grads[1], outs[0] + grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    rl, re, rc = reference(h, w, t, bias, temperature=0.8, logit_scale=1.5)
    close(outs[1][0], rl, 1e-5)
    close(outs[1][2], rc.log(), 1e-5)
    with pytest.raises(ValueError, match="softcap"):
        TRLChunkedLogProbAdapter.apply(h, w, None, t, 1.0, 128, 30.0, 1.0, ("log_probs",))
    with pytest.raises(ValueError, match="is_top1"):
        TRLChunkedLogProbAdapter.apply(h, w, None, t, 1.0, 128, None, 1.0, ("log_probs", "is_top1"))


def test_adapter_in_trl_patched_forward(monkeypatch):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from stapo.engines.trl.lm_head import TRLChunkedLogProbAdapter

    model = _tiny_qwen3(tie=True)
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(15))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt positions are not scored
    with torch.no_grad():
        theirs = model(input_ids=ids, labels=labels, fused_lm_head=True)
        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", TRLChunkedLogProbAdapter)
        ours = model(input_ids=ids, labels=labels, fused_lm_head=True)
        logp = (model(input_ids=ids).logits[:, :-1].double() / 0.7).log_softmax(-1)
    mask = labels[:, 1:] != -100
    ref_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask
    ref_ent = -(logp.exp() * logp).sum(-1) * mask
    close(ours.log_probs, ref_lp, 1e-5)
    close(ours.entropy, ref_ent, 1e-5)
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=1e-4, atol=1e-5)
