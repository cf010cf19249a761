"""GPU benchmark of the LM-head log-prob + entropy paths, one run, one markdown table (< 5 min on an H100/H200).

Head (bf16, N tokens, hidden H, vocabulary V; forward + backward of sum(g · logprob), entropy detached):
  matmul-3      the three GEMMs any exact method needs (logits, dlogits@W, dlogitsᵀ@h; 6·N·H·V flop): the floor
  stapo         stapo.core.lm_head_logprobs_entropy (Triton tile passes on CUDA), one row per vocab_chunk
  stapo-torch   the same function forced onto its PyTorch tile passes
  stapo (triton-gemm)  the same function on Triton GEMMs with the softmax in their epilogue (CUDA only)
  trl-style     bf16 [N, V] logits, chunked float32 logsumexp with autograd, chunked no-grad entropy
  fp32-full     float32 [N, V] logits, log_softmax, gather; entropy under no_grad
  trl-fused     trl.kernels.ChunkedLogProbFunction (TRL >= 1.16's own head), when trl is importable
Times are CUDA-event medians; peak is torch.cuda.max_memory_allocated over the timed repetitions and
includes the inputs (hidden, weight) and the gradients. Δ columns: max |error| of the per-token
log-prob / entropy on the first rows against float64 computed from the same bf16 inputs, and the
max error of their hidden-state gradient relative to its largest entry.

Model: a random-init Qwen3-1.7B (from Qwen3Config, nothing downloaded), bf16, activation checkpointing,
one STAPO loss step (forward + backward) on B × T tokens, with the fused head (backbone hidden states +
lm_head_logprobs_entropy) vs without (full logits + stapo.core.token_logprobs_entropy).

    python benchmarks/gpu_lm_head.py                 # H100/H200: N=16384, H=2048 and 4096, V=151936
    python benchmarks/gpu_lm_head.py --tiny          # CPU smoke run at toy sizes (used by the tests)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stapo.core import stapo_loss, token_logprobs_entropy  # noqa: E402
from stapo.core.lm_head import (  # noqa: E402
    causal_lm_head_params,
    causal_lm_hidden_states,
    lm_head_logprobs_entropy,
    resolve_backend,
)

GIB = 1024**3
CHECK_ROWS = 256


def _has_triton():
    try:
        from stapo.core import lm_head_triton
    except ImportError:
        return False
    return lm_head_triton.AVAILABLE


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, reps, dev):
    """(median ms, peak GiB or None) of fn() after one warm-up call (compiles kernels)."""
    fn()
    sync(dev)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / GIB if dev.type == "cuda" else None
    return statistics.median(times), peak


# ------------------------------------------------------------------------------------------------
# Head paths: each returns (logprobs, entropy) of its last call for the exactness columns
# ------------------------------------------------------------------------------------------------


def path_matmul3(h, w, t, g, temperature, **_):
    def run():
        logits = h @ w.T
        logits @ w
        logits.T @ h
        return None

    return run


def _leaves(h, w):
    return h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()


def path_stapo(h, w, t, g, temperature, backend="auto", vocab_chunk=None, **_):
    hl, wl = _leaves(h, w)

    def run():
        lp, ent = lm_head_logprobs_entropy(hl, wl, t, temperature=temperature, vocab_chunk=vocab_chunk, backend=backend)
        (lp * g).sum().backward()
        gh = hl.grad[:CHECK_ROWS].clone()
        hl.grad = wl.grad = None
        return lp.detach(), ent, gh

    return run


def path_trl_style(h, w, t, g, temperature, chunk=1024, **_):
    hl, wl = _leaves(h, w)

    def run():
        logits = (hl @ wl.T) / temperature  # bf16 [N, V], kept for the backward
        lps = []
        for s in range(0, logits.shape[0], chunk):
            c = logits[s : s + chunk]
            lps.append(c.gather(1, t[s : s + chunk, None]).squeeze(1).float() - c.float().logsumexp(-1))
        lp = torch.cat(lps)
        with torch.no_grad():
            ents = []
            for s in range(0, logits.shape[0], chunk):
                logp = logits[s : s + chunk].float().log_softmax(-1)
                ents.append(-(logp.exp() * logp).sum(-1))
            ent = torch.cat(ents)
        (lp * g).sum().backward()
        gh = hl.grad[:CHECK_ROWS].clone()
        hl.grad = wl.grad = None
        return lp.detach(), ent, gh

    return run


def path_fp32_full(h, w, t, g, temperature, **_):
    hl, wl = _leaves(h, w)

    def run():
        logp = ((hl @ wl.T).float() / temperature).log_softmax(-1)
        lp = logp.gather(1, t[:, None]).squeeze(1)
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
        (lp * g).sum().backward()
        gh = hl.grad[:CHECK_ROWS].clone()
        hl.grad = wl.grad = None
        return lp.detach(), ent, gh

    return run


def path_trl_fused(h, w, t, g, temperature, **_):
    from trl.kernels import ChunkedLogProbFunction  # TRL >= 1.16

    hl, wl = _leaves(h, w)

    def run():
        lp, ent, *_rest = ChunkedLogProbFunction.apply(hl, wl, None, t, temperature, 32768, None, 1.0, ("entropy",))
        (lp * g).sum().backward()
        gh = hl.grad[:CHECK_ROWS].clone()
        hl.grad = wl.grad = None
        return lp.detach(), ent, gh

    return run


def reference_rows(h, w, t, g, temperature, rows):
    """float64 log-probs, entropies and d(sum g·logprob)/dh on the first rows (same bf16 inputs)."""
    wd = w.double()
    z = (h[:rows].double() @ wd.T) / temperature
    logp = z.log_softmax(-1)
    dz = -logp.exp()
    dz[torch.arange(rows, device=z.device), t[:rows]] += 1.0
    grad_h = (dz * (g[:rows, None].double() / temperature)) @ wd
    return logp.gather(1, t[:rows, None]).squeeze(1), -(logp.exp() * logp).sum(-1), grad_h


def bench_head(args, dev, dtype, hidden_size, rows_out):
    n, v = args.tokens, args.vocab
    gen = torch.Generator(device=dev).manual_seed(0)
    # Real-model-like scale: logits with a std of a few units, so softmaxes are neither flat nor one-hot.
    h = torch.randn(n, hidden_size, device=dev, generator=gen).to(dtype)
    w = (torch.randn(v, hidden_size, device=dev, generator=gen) * (3.0 / hidden_size**0.5)).to(dtype)
    t = torch.randint(0, v, (n,), device=dev, generator=gen)
    g = torch.randn(n, device=dev, generator=gen)
    ref_lp, ref_ent, ref_gh = reference_rows(h, w, t, g, args.temperature, min(CHECK_ROWS, n))
    paths = [("matmul-3", path_matmul3, {})]
    for vc in args.vocab_chunks:
        paths.append((f"stapo ({resolve_backend('auto', dev)}, vocab_chunk={vc})", path_stapo, {"vocab_chunk": vc}))
    paths.append((f"stapo-torch (vocab_chunk={args.vocab_chunks[0]})", path_stapo,
                  {"backend": "torch", "vocab_chunk": args.vocab_chunks[0]}))
    if dev.type == "cuda" and _has_triton():
        paths.append((f"stapo (triton-gemm, vocab_chunk={args.vocab_chunks[0]})", path_stapo,
                      {"backend": "triton-gemm", "vocab_chunk": args.vocab_chunks[0]}))
    paths.append(("trl-style", path_trl_style, {}))
    if not args.skip_fp32:
        paths.append(("fp32-full", path_fp32_full, {}))
    try:
        import trl.kernels  # noqa: F401

        paths.append(("trl-fused", path_trl_fused, {}))
    except Exception:  # trl absent (or too old): that row is skipped
        pass
    results = {}
    for name, make, kw in paths:
        try:
            run = make(h, w, t, g, args.temperature, **kw)
            ms, peak = measure(run, args.reps, dev)
            out = run()
            err = (None, None, None)
            if out is not None:
                lp, ent, gh = out
                k = ref_lp.shape[0]
                err = ((lp[:k].double() - ref_lp).abs().max().item(), (ent[:k].double() - ref_ent).abs().max().item(),
                       ((gh.double() - ref_gh).abs().max() / ref_gh.abs().max()).item())
            results[name] = (ms, peak, err)
        except torch.cuda.OutOfMemoryError:
            results[name] = (None, None, (None, None, None))
        except Exception:  # one failing path (e.g. a kernel that does not compile) must not end the run
            traceback.print_exc()
            results[name] = ("error", None, (None, None, None))
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    floor = results["matmul-3"][0]
    trl_ms = results["trl-style"][0] if results["trl-style"][0] != "error" else None
    for name, (ms, peak, (elp, eent, egh)) in results.items():
        if ms == "error":
            rows_out.append([name, str(hidden_size), "error"] + ["-"] * 6)
            continue
        rows_out.append([
            name, str(hidden_size),
            "OOM" if ms is None else f"{ms:.1f}",
            "-" if peak is None else f"{peak:.2f}",
            "-" if ms is None or not floor else f"{ms / floor:.2f}",
            "-" if ms is None or not trl_ms else f"{ms / trl_ms:.2f}",
            "-" if elp is None else f"{elp:.1e}",
            "-" if eent is None else f"{eent:.1e}",
            "-" if egh is None else f"{egh:.1e}",
        ])


# ------------------------------------------------------------------------------------------------
# Model step
# ------------------------------------------------------------------------------------------------


def build_qwen3(args, dev, dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if args.tiny:
        cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                          max_position_embeddings=4096)
    else:  # Qwen3-1.7B's published shape
        cfg = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                          max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.train()
    return model


def bench_model(args, dev, dtype, rows_out):
    model = build_qwen3(args, dev, dtype)
    vocab = model.config.vocab_size
    b, seq, prompt = args.batch, args.seq, args.seq // 4
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, vocab, (b, seq), device=dev, generator=gen)
    targets = ids[:, prompt:]
    mask = torch.ones_like(targets, dtype=torch.bool)
    adv = torch.randn(b, device=dev, generator=gen)
    n_params = sum(p.numel() for p in model.parameters())

    def step(backend):
        def run():
            if backend is not None:
                params = causal_lm_head_params(model)
                hidden = causal_lm_hidden_states(model, ids)[:, prompt - 1 : -1]
                lp, ent = lm_head_logprobs_entropy(hidden, params.weight, targets, bias=params.bias,
                                                   temperature=args.temperature, logit_scale=params.logit_scale,
                                                   backend=backend)
            else:
                logits = model(input_ids=ids).logits[:, prompt - 1 : -1]
                lp, ent = token_logprobs_entropy(logits, targets, temperature=args.temperature)
            loss, _ = stapo_loss(lp, lp.detach(), adv, mask, ent)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return None

        return run

    results = {}
    steps = [("qwen3 step, full logits + token_logprobs_entropy", None),
             ("qwen3 step, fused lm_head_logprobs_entropy", "auto")]
    if dev.type == "cuda" and _has_triton():
        steps.append(("qwen3 step, fused lm_head_logprobs_entropy (triton-gemm)", "triton-gemm"))
    for name, backend in steps:
        try:
            results[name] = measure(step(backend), args.model_reps, dev)
        except torch.cuda.OutOfMemoryError:
            results[name] = (None, None)
        except Exception:
            traceback.print_exc()
            results[name] = (None, None)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = results["qwen3 step, full logits + token_logprobs_entropy"][0]
    tokens = b * seq
    for name, (ms, peak) in results.items():
        rows_out.append([
            name, f"{n_params / 1e9:.2f}B params, {b}x{seq} tokens",
            "OOM" if ms is None else f"{ms:.1f}",
            "-" if peak is None else f"{peak:.2f}",
            "-" if ms is None else f"{tokens / (ms / 1e3):,.0f} tok/s",
            "-" if ms is None or not base else f"{ms / base:.2f}",
        ])


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--vocab-chunks", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-fp32", action="store_true", help="skip the float32 full-logits path (~47 GiB)")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--model-reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.vocab, args.hidden = 96, 1000, [32, 48]
        args.vocab_chunks, args.reps, args.batch, args.seq, args.model_reps = [256], 1, 2, 64, 1
        dev = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for a CPU smoke run")
        dev = torch.device("cuda")
    dtype = torch.bfloat16
    t_start = time.perf_counter()
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"# lm-head benchmark — {card}, torch {torch.__version__}, {datetime.date.today().isoformat()}")
    print(f"command: python benchmarks/gpu_lm_head.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"N={args.tokens} V={args.vocab} dtype=bf16 T={args.temperature} reps={args.reps}\n")
    rows = []
    for hs in args.hidden:
        bench_head(args, dev, dtype, hs, rows)
    print(table(["path", "H", "median ms", "peak GiB", "x matmul-3", "x trl-style", "max|Δlogprob|",
                 "max|Δentropy|",
                 "rel Δgrad_h"], rows))
    sys.stdout.flush()
    if not args.skip_model:
        mrows = []
        bench_model(args, dev, dtype, mrows)
        print()
        print(table(["step", "shape", "median ms", "peak GiB", "throughput", "x full-logits"], mrows))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
