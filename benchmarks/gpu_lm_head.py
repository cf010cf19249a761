"""GPU benchmark of the LM-head log-prob + entropy paths, one run, one markdown table (< 5 min on an H100/H200).

Head (bf16, N tokens, hidden H, vocabulary V; forward + backward of sum(g · logprob), entropy detached):
  matmul-3      the three GEMMs any exact method needs (logits, dlogits@W, dlogitsᵀ@h; 6·N·H·V flop): the floor
  stapo         stapo.core.lm_head_logprobs_entropy (Triton tile passes on CUDA), one row per vocab_chunk
  stapo-torch   the same function forced onto its PyTorch tile passes
  stapo (triton-gemm)  the same function on Triton GEMMs with the softmax in their epilogue (CUDA only)
  trl-style     bf16 [N, V] logits, chunked float32 logsumexp with autograd, chunked no-grad entropy
  fp32-full     float32 [N, V] logits, log_softmax, gather; entropy under no_grad
  trl-fused     trl.kernels.ChunkedLogProbFunction (TRL >= 1.16's own head), when trl is importable

Peers (second table), each imported lazily; one that is missing or fails gets its reason in the
table and the run goes on. All minimise the same loss, -Σ logprob (the sum of per-token cross
entropies, what a CE kernel computes natively), on the same inputs:
  ours [B] +entropy       lm_head_logprobs_entropy, backend B. It has no entropy-free mode: the
                          entropy is one more running sum in the same pass over each logits tile
  trl-fused logprob-only / +entropy   TRL's head with outputs=("log_probs",) and with the entropy,
                          the cost of the entropy for a head that can switch it off
  liger-flce              Liger-Kernel's fused linear cross-entropy (no entropy)
  cce / cce exact-grad    Apple's Cut Cross-Entropy, default gradient filter / filter_eps=None
  verl-lce (triton)       verl's linear_cross_entropy kernel (log-probs and entropy)
  verl-fused-ppo (torch)  verl's FusedLinearForPPO (chunked PyTorch, log-probs and entropy)
verl's package imports Ray and more at import time; where that fails, its two kernel modules are
loaded without verl/__init__ (they need only torch, triton and verl.utils.device), and the row says so.

Backend choice (third table): per measured case (each H, and the model step), the Triton backend
"triton" (cuBLAS GEMM + Triton tile pass, the current CUDA default) against "triton-gemm" (Triton
GEMM with the softmax in its epilogue); see `choose_backend` for the rule.

With --out-dir DIR the tables are also written as DIR/lm_head.md and DIR/lm_head.json, rewritten
after every measured case, so a run stopped by a time limit keeps what it measured.
Times are CUDA-event medians; peak is torch.cuda.max_memory_allocated over the timed repetitions and
includes the inputs (hidden, weight) and the gradients. Δ columns: max |error| of the per-token
log-prob / entropy on the first rows against float64 computed from the same bf16 inputs, and the
max error of their hidden-state gradient relative to its largest entry.

Model: a random-init Qwen3-1.7B (from Qwen3Config, nothing downloaded), bf16, activation checkpointing,
one STAPO loss step (forward + backward) on B × T tokens, with the fused head (backbone hidden states +
lm_head_logprobs_entropy) vs without (full logits + stapo.core.token_logprobs_entropy).

    python benchmarks/gpu_lm_head.py                 # H100/H200: N=16384, H=2048 and 4096, V=151936
    python benchmarks/gpu_lm_head.py --tiny          # CPU smoke run at toy sizes (used by the tests)
    TRITON_INTERPRET=1 python benchmarks/gpu_lm_head.py --tiny   # + the Triton rows, interpreted on CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stapo.core import stapo_loss, token_logprobs_entropy
from stapo.core.lm_head import (
    causal_lm_head_params,
    causal_lm_hidden_states,
    lm_head_logprobs_entropy,
    resolve_backend,
)
from stapo.rundir import atomic_write_text

GIB = 1024**3
CHECK_ROWS = 256


def _has_triton():
    try:
        from stapo.core import lm_head_triton
    except ImportError:
        return False
    return lm_head_triton.AVAILABLE


def _triton_rows(dev):
    """Whether the Triton backends run here: on CUDA, or on CPU under TRITON_INTERPRET=1 (the tests)."""
    if not _has_triton():
        return False
    from stapo.core import lm_head_triton

    return dev.type == "cuda" or lm_head_triton.INTERPRET


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


def path_trl_fused(h, w, t, g, temperature, outputs=("log_probs", "entropy"), **_):
    from trl.kernels import ChunkedLogProbFunction  # TRL >= 1.16

    hl, wl = _leaves(h, w)

    def run():
        lp, ent, *_rest = ChunkedLogProbFunction.apply(hl, wl, None, t, temperature, 32768, None, 1.0, outputs)
        (lp * g).sum().backward()
        gh = hl.grad[:CHECK_ROWS].clone()
        hl.grad = wl.grad = None
        return lp.detach(), ent, gh

    return run


# ------------------------------------------------------------------------------------------------
# Peers: other libraries' fused heads, imported when their row runs
# ------------------------------------------------------------------------------------------------


def import_bypassing_init(name, extra_packages=()):
    """(module, note): `name` through its package if that imports, else with its package __init__s skipped.

    Bare package objects stand in for the folders above `name` (and for `extra_packages`, other
    folders of the same distribution its imports need), so the module's own file loads as it is.
    """
    top = name.split(".")[0]
    try:
        module = importlib.import_module(name)
        # Loaded through bare packages by an earlier call: the same note applies.
        return module, _BYPASS_NOTES.get(top, "") if getattr(sys.modules[top], "__bare_package__", False) else ""
    except ImportError as err:
        reason = f"{type(err).__name__}: {err}"
    for k in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
        del sys.modules[k]  # whatever the failed attempt left half-imported
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise ImportError(f"{top} is not installed ({reason})")
    root = Path(spec.origin).parent
    parts = name.split(".")
    packages = [".".join(parts[:i]) for i in range(1, len(parts))] + list(extra_packages)
    for pkg in packages:
        folder = root.joinpath(*pkg.split(".")[1:])
        if pkg not in sys.modules and folder.is_dir():
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(folder)]
            mod.__bare_package__ = True
            sys.modules[pkg] = mod
    module = importlib.import_module(name)
    _BYPASS_NOTES[top] = f"{top} package not importable ({reason[:80]}); module loaded without its package __init__"
    return module, _BYPASS_NOTES[top]


_BYPASS_NOTES = {}


def import_verl_module(name):
    """verl's `name`: verl/__init__ imports Ray, Hydra and TensorDict, which the GPU image lacks; its
    kernel modules need only torch, triton and verl.utils.device (which imports verl.plugin)."""
    return import_bypassing_init(name, ("verl.plugin",))


def _ce_peer(loss_fn):
    """A path for a peer that returns per-token cross entropies (= -logprob) and no entropy.

    The timed call backpropagates reduction="sum" (the loss -Σ logprob, i.e. g = -1 everywhere); the
    check call adds a no-grad reduction="none" pass on the checked rows for the log-prob column.
    """

    def make(h, w, t, g, temperature, **_):
        hl, wl = _leaves(h, w)
        k = min(CHECK_ROWS, h.shape[0])

        def run(check=False):
            x = hl if temperature == 1.0 else hl / temperature
            loss_fn(x, wl, t, "sum").backward()
            if not check:
                hl.grad = wl.grad = None
                return None
            gh = hl.grad[:k].clone()
            hl.grad = wl.grad = None
            with torch.no_grad():
                lp = -loss_fn(h[:k] / temperature, w, t[:k], "none").float()
            return lp, None, gh

        return run

    return make


def path_liger(h, w, t, g, temperature, **kw):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return _ce_peer(lambda x, wt, tg, red: liger_fused_linear_cross_entropy(x, wt, tg, reduction=red))(
        h, w, t, g, temperature)


def path_cce(h, w, t, g, temperature, filter_eps="high", **_):
    from cut_cross_entropy import linear_cross_entropy

    return _ce_peer(lambda x, wt, tg, red: linear_cross_entropy(x, wt, tg, reduction=red, filter_eps=filter_eps))(
        h, w, t, g, temperature)


def _logprob_entropy_peer(fn):
    """A path for a peer returning (logprobs, entropy); a differentiable entropy gets a zero gradient."""

    def make(h, w, t, g, temperature, **_):
        hl, wl = _leaves(h, w)
        k = min(CHECK_ROWS, h.shape[0])

        def run(check=False):
            lp, ent = fn(hl, wl, t, temperature)
            outs, grads = [lp], [g.to(lp.dtype).expand_as(lp)]
            if ent.requires_grad:  # verl's entropy is differentiable: its backward expects a gradient
                outs.append(ent)
                grads.append(torch.zeros_like(ent))
            torch.autograd.backward(outs, grads)
            if not check:
                hl.grad = wl.grad = None
                return None
            gh = hl.grad[:k].clone()
            hl.grad = wl.grad = None
            return lp.detach().float(), ent.detach().float(), gh

        return run

    return make


def path_verl_lce(h, w, t, g, temperature, **_):
    mod, note = import_verl_module("verl.utils.kernel.linear_cross_entropy")
    run = _logprob_entropy_peer(lambda x, wt, tg, temp: mod.linear_cross_entropy(x, wt, tg, float(temp), "none"))(
        h, w, t, g, temperature)
    run.note = note
    return run


def path_verl_fused_ppo(h, w, t, g, temperature, **_):
    mod, note = import_verl_module("verl.utils.experimental.torch_functional")
    head = mod.FusedLinearForPPO(chunk_size=512)
    run = _logprob_entropy_peer(lambda x, wt, tg, temp: head(x, wt, tg, temperature=float(temp)))(
        h, w, t, g, temperature)
    run.note = note
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


@dataclass
class Case:
    """One timed path: what it is, how to build it, and whether its entropy column means anything."""

    name: str
    make: object
    kwargs: dict
    entropy: bool = True
    peer: bool = False  # peers' run() takes check=True for the exactness call
    note: str = ""


def peer_cases(dev, first_chunk):
    cases = [Case("ours [auto] +entropy", path_stapo, {"vocab_chunk": first_chunk}, peer=False,
                  note=f"backend {resolve_backend('auto', dev)}; entropy in the same pass (no entropy-free mode)")]
    if _triton_rows(dev):
        cases.append(Case("ours [triton-gemm] +entropy", path_stapo,
                          {"backend": "triton-gemm", "vocab_chunk": first_chunk}))
    cases += [
        Case("trl-fused logprob-only", path_trl_fused, {"outputs": ("log_probs",)}, entropy=False),
        Case("trl-fused +entropy", path_trl_fused, {"outputs": ("log_probs", "entropy")}),
        Case("liger-flce", path_liger, {}, entropy=False, peer=True),
        Case("cce", path_cce, {"filter_eps": "high"}, entropy=False, peer=True, note="default gradient filter"),
        Case("cce exact-grad", path_cce, {"filter_eps": None}, entropy=False, peer=True, note="filter_eps=None"),
        Case("verl-lce (triton)", path_verl_lce, {}, peer=True),
        Case("verl-fused-ppo (torch)", path_verl_fused_ppo, {}, peer=True, note="chunk_size=512"),
    ]
    return cases


def _reason(err):
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"[:160]


def time_case(case, h, w, t, g, temperature, reps, dev, ref):
    """{"status", "ms", "peak_gib", "err_logprob", "err_entropy", "err_grad_h", "reason"} for one case.

    status: ok | missing (the import failed) | failed (anything else) | OOM. One failing case must
    not end the run (e.g. a peer that needs CUDA, or a kernel that does not compile).
    """
    out = {"status": "ok", "ms": None, "peak_gib": None, "err_logprob": None, "err_entropy": None,
           "err_grad_h": None, "reason": "", "note": ""}
    try:
        run = case.make(h, w, t, g, temperature, **case.kwargs)
    except ImportError as err:
        out.update(status="missing", reason=_reason(err))
        return out
    except Exception as err:  # noqa: BLE001 - any failure to build a path becomes that row's status
        out.update(status="failed", reason=_reason(err))
        return out
    out["note"] = getattr(run, "note", "")
    try:
        ms, peak = measure(run, reps, dev)
        res = run(check=True) if case.peer else run()
        out.update(ms=ms, peak_gib=peak)
        if res is not None:
            lp, ent, gh = res
            ref_lp, ref_ent, ref_gh = ref
            k = ref_lp.shape[0]
            out["err_logprob"] = (lp[:k].double() - ref_lp).abs().max().item()
            if case.entropy and ent is not None:
                out["err_entropy"] = (ent[:k].double() - ref_ent).abs().max().item()
            out["err_grad_h"] = ((gh[:k].double() - ref_gh).abs().max() / ref_gh.abs().max()).item()
    except torch.cuda.OutOfMemoryError:
        out.update(status="OOM", ms=None)
    except Exception as err:  # noqa: BLE001 - any failure while timing becomes that row's status
        if not case.peer:
            traceback.print_exc()
        out.update(status="failed", ms=None, peak_gib=None, reason=_reason(err))
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def bench_head(args, dev, dtype, hidden_size, results):
    """Appends this H's rows to results["head"] (our paths) and results["peers"]."""
    n, v = args.tokens, args.vocab
    gen = torch.Generator(device=dev).manual_seed(0)
    # Real-model-like scale: logits with a std of a few units, so softmaxes are neither flat nor one-hot.
    h = torch.randn(n, hidden_size, device=dev, generator=gen).to(dtype)
    w = (torch.randn(v, hidden_size, device=dev, generator=gen) * (3.0 / hidden_size**0.5)).to(dtype)
    t = torch.randint(0, v, (n,), device=dev, generator=gen)
    g = torch.randn(n, device=dev, generator=gen)
    k = min(CHECK_ROWS, n)
    ref = reference_rows(h, w, t, g, args.temperature, k)
    first = args.vocab_chunks[0]
    cases = [Case("matmul-3", path_matmul3, {})]
    auto = resolve_backend("auto", dev)
    for vc in args.vocab_chunks:
        cases.append(Case(f"stapo ({auto}, vocab_chunk={vc})", path_stapo, {"vocab_chunk": vc}))
    cases.append(Case(f"stapo-torch (vocab_chunk={first})", path_stapo, {"backend": "torch", "vocab_chunk": first}))
    if _triton_rows(dev):
        if auto != "triton":  # CPU under TRITON_INTERPRET=1: the CUDA default's row, interpreted
            cases.append(Case(f"stapo (triton, vocab_chunk={first})", path_stapo,
                              {"backend": "triton", "vocab_chunk": first}))
        cases.append(Case(f"stapo (triton-gemm, vocab_chunk={first})", path_stapo,
                          {"backend": "triton-gemm", "vocab_chunk": first}))
    cases.append(Case("trl-style", path_trl_style, {}))
    if not args.skip_fp32:
        cases.append(Case("fp32-full", path_fp32_full, {}))
    try:
        import trl.kernels  # noqa: F401

        cases.append(Case("trl-fused", path_trl_fused, {}))
    except Exception:  # noqa: BLE001 - trl absent (or too old): that row is skipped
        pass
    rows = []
    for case in cases:
        r = time_case(case, h, w, t, g, args.temperature, args.reps, dev, ref)
        rows.append({"path": case.name, "H": hidden_size, **r})
        if args.progress:
            args.progress()
    floor = rows[0]["ms"]
    trl_ms = next(r["ms"] for r in rows if r["path"] == "trl-style")
    for r in rows:
        r["x_floor"] = r["ms"] / floor if r["ms"] is not None and floor else None
        r["x_trl_style"] = r["ms"] / trl_ms if r["ms"] is not None and trl_ms else None
    results["head"].extend(rows)
    if args.skip_peers:
        return
    # Peers: loss -Σ logprob, so the gradient reference is the float64 one for g = -1.
    g_ce = torch.full_like(g, -1.0)
    ref_ce = reference_rows(h, w, t, g_ce, args.temperature, k)
    for case in peer_cases(dev, first):
        r = time_case(case, h, w, t, g_ce, args.temperature, args.reps, dev, ref_ce)
        r["note"] = "; ".join(x for x in (case.note, r["note"]) if x)
        r["x_floor"] = r["ms"] / floor if r["ms"] is not None and floor else None
        results["peers"].append({"peer": case.name, "H": hidden_size, "entropy": case.entropy, **r})
        if args.progress:
            args.progress()


def head_table(rows):
    out = []
    for r in rows:
        if r["status"] == "failed":
            out.append([r["path"], str(r["H"]), "error"] + ["-"] * 6)
            continue
        out.append([
            r["path"], str(r["H"]),
            "OOM" if r["ms"] is None else f"{r['ms']:.1f}",
            _fmt(r["peak_gib"], ".2f"), _fmt(r["x_floor"], ".2f"), _fmt(r["x_trl_style"], ".2f"),
            _fmt(r["err_logprob"], ".1e"), _fmt(r["err_entropy"], ".1e"), _fmt(r["err_grad_h"], ".1e"),
        ])
    return table(["path", "H", "median ms", "peak GiB", "x matmul-3", "x trl-style", "max|Δlogprob|",
                  "max|Δentropy|", "rel Δgrad_h"], out)


def peer_table(rows):
    out = []
    for r in rows:
        note = "; ".join(x for x in (r["reason"], r["note"]) if x).replace("|", "/")
        out.append([
            r["peer"], str(r["H"]), r["status"], _fmt(r["ms"], ".1f"), _fmt(r["peak_gib"], ".2f"),
            _fmt(r["x_floor"], ".2f"), "yes" if r["entropy"] else "no",
            _fmt(r["err_logprob"], ".1e"), _fmt(r["err_entropy"], ".1e"), _fmt(r["err_grad_h"], ".1e"), note,
        ])
    return table(["peer", "H", "status", "median ms", "peak GiB", "x matmul-3", "entropy", "max abs Δlogprob",
                  "max abs Δentropy", "rel Δgrad_h", "note"], out)


# ------------------------------------------------------------------------------------------------
# Backend choice: "triton" (current CUDA default) vs "triton-gemm", per measured case
# ------------------------------------------------------------------------------------------------

CHOICE_MARGIN = 0.03  # triton-gemm must be this much faster: smaller gaps are within run-to-run noise
ERROR_SLACK = 2.0  # ... and no less exact than this factor of triton's error (or below ERROR_FLOOR)
ERROR_FLOOR = 1e-4


def choose_backend(triton_case, gemm_case):
    """(choice, why) for one measured case; each argument is a dict with "ms" and optional "err_*".

    "triton-gemm" where it ran, was at least CHOICE_MARGIN faster and no less exact (each error at
    most ERROR_SLACK × triton's, or below ERROR_FLOOR); otherwise "triton", the current default.
    """
    if triton_case is None or triton_case.get("ms") is None:
        return "triton", "triton not measured"
    if gemm_case is None or gemm_case.get("ms") is None:
        return "triton", "triton-gemm not measured (failed, OOM or absent)"
    ratio = gemm_case["ms"] / triton_case["ms"]
    for key in ("err_logprob", "err_entropy", "err_grad_h"):
        a, b = triton_case.get(key), gemm_case.get(key)
        if b is not None and b > ERROR_FLOOR and (a is None or b > ERROR_SLACK * a):
            return "triton", f"triton-gemm less exact ({key} {b:.1e} vs {_fmt(a, '.1e')})"
    if ratio <= 1.0 - CHOICE_MARGIN:
        return "triton-gemm", f"{ratio:.2f}x the time of triton"
    return "triton", f"triton-gemm {ratio:.2f}x the time of triton (needs <= {1 - CHOICE_MARGIN:.2f})"


def backend_choices(results, first_chunk):
    rows = []
    for hs in sorted({r["H"] for r in results["head"]}):
        by = {r["path"]: r for r in results["head"] if r["H"] == hs}
        tri = by.get(f"stapo (triton, vocab_chunk={first_chunk})")
        gem = by.get(f"stapo (triton-gemm, vocab_chunk={first_chunk})")
        if tri is None and gem is None:
            continue
        choice, why = choose_backend(tri, gem)
        rows.append({"case": f"head H={hs} N={results['meta']['tokens']} V={results['meta']['vocab']}",
                     "triton_ms": tri and tri["ms"], "triton_gemm_ms": gem and gem["ms"], "choice": choice, "why": why})
    by = {r["backend"]: r for r in results["model"]}
    tri, gem = by.get("triton"), by.get("triton-gemm")
    if tri is not None or gem is not None:
        choice, why = choose_backend(tri, gem)
        rows.append({"case": f"model step ({(tri or gem)['shape']})", "triton_ms": tri and tri["ms"],
                     "triton_gemm_ms": gem and gem["ms"], "choice": choice, "why": why})
    return rows


def choice_table(rows):
    return table(["case", "triton ms", "triton-gemm ms", "choice", "why"],
                 [[r["case"], _fmt(r["triton_ms"], ".1f"), _fmt(r["triton_gemm_ms"], ".1f"), r["choice"], r["why"]]
                  for r in rows])


# ------------------------------------------------------------------------------------------------
# Model step
# ------------------------------------------------------------------------------------------------


# Published Qwen3 shapes (Qwen3Config keyword arguments), nothing downloaded; "tiny" is a CPU toy.
QWEN3_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096),
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
               max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


def random_qwen3(shape, dev, dtype, seed=0, **overrides):
    """A randomly initialised Qwen3ForCausalLM of a QWEN3_SHAPES entry, built directly on `dev` in `dtype`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{**QWEN3_SHAPES[shape], **overrides})
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    try:
        with torch.device(dev):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


def build_qwen3(args, dev, dtype):
    if args.tiny:
        model = random_qwen3("tiny", dev, dtype, vocab_size=args.vocab)
    else:
        model = random_qwen3("1.7b", dev, dtype)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.train()
    return model


def bench_model(args, dev, dtype, results):
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

    steps = [("qwen3 step, full logits + token_logprobs_entropy", None),
             ("qwen3 step, fused lm_head_logprobs_entropy", "auto")]
    if _triton_rows(dev):
        if resolve_backend("auto", dev) != "triton":
            steps.append(("qwen3 step, fused lm_head_logprobs_entropy (triton)", "triton"))
        steps.append(("qwen3 step, fused lm_head_logprobs_entropy (triton-gemm)", "triton-gemm"))
    rows = []
    shape = f"{n_params / 1e9:.2f}B params, {b}x{seq} tokens"
    for name, backend in steps:
        ms = peak = None
        try:
            ms, peak = measure(step(backend), args.model_reps, dev)
        except torch.cuda.OutOfMemoryError:
            pass
        except Exception:  # noqa: BLE001 - one backend failing leaves the others' rows
            traceback.print_exc()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append({"step": name, "shape": shape,
                     "backend": None if backend is None else resolve_backend(backend, dev),
                     "ms": ms, "peak_gib": peak, "tokens_per_s": None if ms is None else b * seq / (ms / 1e3)})
        if args.progress:
            args.progress()
    base = rows[0]["ms"]
    for r in rows:
        r["x_full_logits"] = r["ms"] / base if r["ms"] is not None and base else None
    results["model"].extend(rows)


def model_table(rows):
    return table(["step", "shape", "median ms", "peak GiB", "throughput", "x full-logits"], [[
        r["step"], r["shape"], "OOM" if r["ms"] is None else f"{r['ms']:.1f}", _fmt(r["peak_gib"], ".2f"),
        "-" if r["ms"] is None else f"{r['tokens_per_s']:,.0f} tok/s", _fmt(r["x_full_logits"], ".2f"),
    ] for r in rows])


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(results):
    m = results["meta"]
    parts = [f"# lm-head benchmark — {m['device']}, torch {m['torch']}, {m['date']}",
             f"command: {m['command']}",
             f"N={m['tokens']} V={m['vocab']} dtype=bf16 T={m['temperature']} reps={m['reps']}", "",
             "## Head: forward + backward of sum(g · logprob), entropy detached", "", head_table(results["head"])]
    if results["peers"]:
        parts += ["", "## Peers: forward + backward of -Σ logprob (sum of cross entropies)", "",
                  peer_table(results["peers"])]
    if results["model"]:
        parts += ["", "## Model step", "", model_table(results["model"])]
    if results["backend_choice"]:
        parts += ["", "## Backend choice per case (triton = current CUDA default)", "",
                  choice_table(results["backend_choice"])]
    if m.get("wall_s") is not None:
        parts += ["", f"total wall time {m['wall_s']:.1f} s"]
    return "\n".join(parts) + "\n"


def write_outputs(results, out_dir):
    """DIR/lm_head.json and DIR/lm_head.md, each replaced whole (a reader never sees half a file)."""
    if out_dir is None:
        return
    results["backend_choice"] = backend_choices(results, results["meta"]["first_vocab_chunk"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("lm_head.json", json.dumps(results, indent=1, default=str)), ("lm_head.md", markdown(results))):
        atomic_write_text(out_dir / name, text)


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
    p.add_argument("--skip-peers", action="store_true", help="skip the other libraries' heads")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--model-reps", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=None, help="also write lm_head.json and lm_head.md here")
    args = p.parse_args(argv)
    if args.tiny:  # toy sizes, except where a size was given explicitly
        tiny = dict(tokens=96, vocab=1000, hidden=[32, 48], vocab_chunks=[256], reps=1, batch=2, seq=64, model_reps=1)
        given = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in tiny.items():
            if key not in given:
                setattr(args, key, value)
        dev = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for a CPU smoke run")
        dev = torch.device("cuda")
    dtype = torch.bfloat16
    t_start = time.perf_counter()
    results = {
        "meta": {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU", "torch": torch.__version__,
                 "date": datetime.date.today().isoformat(),
                 "command": "python benchmarks/gpu_lm_head.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "tokens": args.tokens, "vocab": args.vocab, "temperature": args.temperature, "reps": args.reps,
                 "first_vocab_chunk": args.vocab_chunks[0],
                 "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "wall_s": None},
        "head": [], "peers": [], "model": [], "backend_choice": [],
    }
    args.progress = lambda: write_outputs(results, args.out_dir)
    m = results["meta"]
    print(f"# lm-head benchmark — {m['device']}, torch {m['torch']}, {m['date']}")
    print(f"command: {m['command']}")
    print(f"N={args.tokens} V={args.vocab} dtype=bf16 T={args.temperature} reps={args.reps}\n")
    for hs in args.hidden:
        bench_head(args, dev, dtype, hs, results)
    print(head_table(results["head"]))
    if results["peers"]:
        print()
        print(peer_table(results["peers"]))
    sys.stdout.flush()
    if not args.skip_model:
        bench_model(args, dev, dtype, results)
        print()
        print(model_table(results["model"]))
    results["backend_choice"] = backend_choices(results, args.vocab_chunks[0])
    if results["backend_choice"]:
        print()
        print(choice_table(results["backend_choice"]))
    m["wall_s"] = time.perf_counter() - t_start
    write_outputs(results, args.out_dir)
    print(f"\ntotal wall time {m['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
