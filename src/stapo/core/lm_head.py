"""Per-token log-probs and entropies straight from hidden states, never building [N, V] logits.

`lm_head_logprobs_entropy(hidden [..., H], weight [V, H], targets [...])` returns, with
z = (hidden @ weightᵀ + bias) · logit_scale / T,

    logprob_t = z_t[a_t] − logsumexp_v z_t[v]             (differentiable w.r.t. hidden, weight, bias)
    H_t       = −Σ_v π_v log π_v,   π = softmax(z_t)      (detached)
    Σ_v π_v²  (collision probability, optional)           (detached)
    Σ_v π_v² log π_v  (optional)                          (detached)

all in float32. The logits are produced one [rows, vocab_chunk] tile at a time (GEMM in the
compute dtype, float32 output) and folded into running online-softmax statistics per row: the
running max m, S = Σ e^{z−m}, X = Σ e^{z−m}(z − m), Q = Σ e^{2(z−m)} and R = Σ e^{2(z−m)}(z − m),
so that

    lse = m + log S,   H = log S − X/S,   Σπ² = Q/S²,   Σπ² log π = R/S² − (Q/S²) log S.

H is a sum of two non-negative terms and Σπ² log π of two non-positive ones (no cancellation, so
peaked distributions keep their relative precision). When the max moves by δ = m_old − m_new ≤ 0,
X ← e^δ(X + δS) and R ← e^{2δ}(R + δQ). R is folded only when asked for, and only by the PyTorch
tile pass (the Triton backends route such a call to it). The backward recomputes each tile and turns it into

    dlogprob/dz_raw = g · (onehot(a) − π) · logit_scale / T

then grad_hidden += dz @ W_tile and grad_W[tile] = dzᵀ @ hidden (float32 accumulation). The
vocabulary is the outer loop, so a weight-gradient tile is finished before the next one starts:
no float32 [V, H] accumulator. Peak extra memory is O(rows · vocab_chunk) plus float32 [N, H].

Three backends run the same loop: plain PyTorch (everywhere; the reference), Triton kernels for
the per-tile softmax pass after a cuBLAS GEMM ("triton", chosen automatically on CUDA tensors when
Triton is importable), and Triton GEMMs with the softmax pass in their epilogue, so no logits tile
is ever written ("triton-gemm", opt-in; see `stapo.core.lm_head_triton`).
`STAPO_LM_HEAD_BACKEND=torch` (or `backend="torch"`) forces PyTorch.

`causal_lm_head_params(model)` and `causal_lm_hidden_states(model, ...)` read the head of a
Hugging Face-style causal LM by duck typing (no transformers import).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

BACKEND_ENV = "STAPO_LM_HEAD_BACKEND"
BACKENDS = ("auto", "torch", "triton", "triton-gemm")
DEFAULT_VOCAB_CHUNK = 4096
# Elements of one float32 logits tile (256 MiB): large GEMMs stay efficient, memory stays bounded.
DEFAULT_TILE_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------------------------
# GEMMs with float32 results
# ----------------------------------------------------------------------------------------------


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as float32, without rounding the product to a 16-bit dtype first."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch: no out_dtype
            pass
    return a.float() @ b.float()


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 accumulator."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(a.float(), b.float())


# ----------------------------------------------------------------------------------------------
# Per-tile passes, PyTorch reference (the Triton module mirrors these signatures)
# ----------------------------------------------------------------------------------------------


def fold_tile_torch(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    targets: torch.Tensor,
    vocab_start: int,
    m: torch.Tensor,
    s: torch.Tensor,
    x: torch.Tensor,
    q: torch.Tensor | None,
    target_z: torch.Tensor,
    r: torch.Tensor | None = None,
) -> None:
    """Fold one raw logits tile z [R, C] (float32, overwritten) into the row statistics (in place).

    m, s, x, q, target_z, r are float32 [R] views; q may be None, r (Σ e^{2(z−m)}(z−m)) needs q.
    bias is the [C] slice or None.
    """
    cols = z.shape[1]
    if bias is not None:
        z += bias.float()
    if scale != 1.0:
        z *= scale
    local = targets - vocab_start
    in_tile = (local >= 0) & (local < cols)
    picked = z.gather(1, local.clamp(0, cols - 1)[:, None]).squeeze(1)
    target_z.copy_(torch.where(in_tile, picked, target_z))
    new_m = torch.maximum(m, z.amax(1))
    # Rows seen for the first time have s = 0 and m = −inf: shift by 0 there (no inf·0 = nan).
    delta = torch.where(s > 0, m - new_m, torch.zeros_like(m))
    rescale = delta.exp()
    z -= new_m[:, None]  # z − m ≤ 0 from here on
    e = z.exp()
    x.copy_(rescale * (x + delta * s) + (e * z).sum(1))
    s.copy_(rescale * s + e.sum(1))
    if r is not None:  # before q is updated: the shift of R uses the old Q
        assert q is not None, "r needs q"
        e2 = e * e
        r.copy_(rescale * rescale * (r + delta * q) + (e2 * z).sum(1))
        q.copy_(rescale * rescale * q + e2.sum(1))
    elif q is not None:
        q.copy_(rescale * rescale * q + (e * e).sum(1))
    m.copy_(new_m)


def grad_tile_torch(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    targets: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Turn a raw logits tile z [R, C] (float32, overwritten) into dlogprob/dz_raw, written to out.

    dz = g · (onehot(a) − softmax) · scale; out may be z itself or a [R, C] buffer of another dtype.
    """
    cols = z.shape[1]
    if bias is not None:
        z += bias.float()
    z *= scale
    z -= lse[:, None]
    p = z.exp_()
    p.neg_()
    local = targets - vocab_start
    rows = ((local >= 0) & (local < cols)).nonzero().squeeze(1)
    p[rows, local[rows]] += 1.0
    p *= (grad * scale)[:, None]
    if out is not p:
        out.copy_(p)


# ----------------------------------------------------------------------------------------------
# Backend choice and tiling
# ----------------------------------------------------------------------------------------------


def _triton_module() -> ModuleType | None:
    try:
        from stapo.core import lm_head_triton
    except ImportError:
        return None
    return lm_head_triton if lm_head_triton.AVAILABLE else None


def _loaded_triton() -> ModuleType:
    """The Triton module where `resolve_backend` has already chosen a Triton backend."""
    mod = _triton_module()
    assert mod is not None, "a Triton backend was chosen without triton"
    return mod


def resolve_backend(backend: str, device: torch.device) -> str:
    """'torch' or 'triton' for this call: explicit argument, else $STAPO_LM_HEAD_BACKEND, else auto."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_module() is not None else "torch"
    if backend in ("triton", "triton-gemm"):
        mod = _triton_module()
        if mod is None:
            raise ValueError(f"backend={backend!r} needs the triton package (pip install triton)")
        if device.type != "cuda" and not mod.INTERPRET:
            raise ValueError(f"backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    return backend


def _tile_shape(n_rows: int, vocab: int, chunk_size: int | None, vocab_chunk: int | None) -> tuple[int, int]:
    if vocab_chunk is not None and int(vocab_chunk) < 1:
        raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cols = min(vocab, int(vocab_chunk) if vocab_chunk is not None else DEFAULT_VOCAB_CHUNK)
    rows = int(chunk_size) if chunk_size is not None else max(1, DEFAULT_TILE_ELEMENTS // cols)
    return max(1, min(rows, n_rows)), cols


# ----------------------------------------------------------------------------------------------
# Autograd function
# ----------------------------------------------------------------------------------------------


class _LMHeadLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        scale: float,
        compute_dtype: torch.dtype,
        rows: int,
        cols: int,
        want_collision: bool,
        want_collision_logp: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        ctx.set_materialize_grads(False)
        n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
        fold = fold_tile_torch if backend == "torch" else _loaded_triton().fold_tile
        gemm_fold = _loaded_triton().gemm_fold if backend == "triton-gemm" else None
        fold_cols = max(cols, _loaded_triton().GEMM_FOLD_COLUMNS) if gemm_fold is not None else cols
        m = torch.full((n,), float("-inf"), device=dev, dtype=torch.float32)
        s = torch.zeros(n, device=dev, dtype=torch.float32)
        x = torch.zeros_like(s)
        q = torch.zeros_like(s) if (want_collision or want_collision_logp) else None
        r = torch.zeros_like(s) if want_collision_logp else None
        target_z = torch.zeros_like(s)
        with torch.autocast(dev.type, enabled=False):
            for v0 in range(0, vocab, fold_cols):
                v1 = min(v0 + fold_cols, vocab)
                w_t = weight[v0:v1].to(compute_dtype).t()
                b_t = bias[v0:v1] if bias is not None else None
                for r0 in range(0, n, rows):
                    r1 = min(r0 + rows, n)
                    stats = (m[r0:r1], s[r0:r1], x[r0:r1], q[r0:r1] if q is not None else None, target_z[r0:r1])
                    if gemm_fold is not None:  # the logits tile never leaves the GEMM's registers
                        gemm_fold(hidden[r0:r1].to(compute_dtype), w_t.t(), b_t, scale, targets[r0:r1], v0, *stats)
                        continue
                    z = _mm_fp32(hidden[r0:r1].to(compute_dtype), w_t)
                    if r is None:
                        fold(z, b_t, scale, targets[r0:r1], v0, *stats)
                    else:
                        fold(z, b_t, scale, targets[r0:r1], v0, *stats, r=r[r0:r1])
        log_s = s.log()
        lse = m + log_s
        if n and not bool(torch.isfinite(lse).all()):
            raise ValueError("lm head logits are not finite (NaN/inf in hidden, weight or bias, or overflow)")
        logprobs = target_z - lse
        entropy = log_s - x / s
        # (q is set when either is wanted, r when collision_logp is)
        collision = q / (s * s) if want_collision and q is not None else None
        collision_logp = (r - q * log_s) / (s * s) if want_collision_logp and r is not None and q is not None else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.scale, ctx.compute_dtype, ctx.rows, ctx.cols, ctx.backend = scale, compute_dtype, rows, cols, backend
        ctx.mark_non_differentiable(*(t for t in (entropy, collision, collision_logp) if t is not None))
        return logprobs, entropy, collision, collision_logp

    @staticmethod
    def backward(
        ctx: Any,
        grad_logprobs: torch.Tensor | None,
        _grad_entropy: torch.Tensor | None,
        _grad_collision: torch.Tensor | None,
        _grad_collision_logp: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logprobs is None or not (need_h or need_w or need_b):
            return (None,) * 11
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        scale, cdt, rows, cols = ctx.scale, ctx.compute_dtype, ctx.rows, ctx.cols
        unfold = grad_tile_torch if ctx.backend == "torch" else _loaded_triton().grad_tile
        gemm_grad = _loaded_triton().gemm_grad if ctx.backend == "triton-gemm" else None
        n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
        g = grad_logprobs.float().contiguous()
        # The dz tile feeds two GEMMs: in the compute dtype on CUDA (tensor cores), float32 elsewhere.
        dz_dtype = cdt if dev.type == "cuda" else torch.float32
        grad_h = torch.zeros(hidden.shape, device=dev, dtype=torch.float32) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.zeros(vocab, device=dev, dtype=torch.float32) if need_b else None
        single_chunk = rows >= n
        with torch.autocast(dev.type, enabled=False):
            for v0 in range(0, vocab, cols):
                v1 = min(v0 + cols, vocab)
                w_c = weight[v0:v1].to(cdt)
                b_t = bias[v0:v1] if bias is not None else None
                acc_w = None
                if need_w and not single_chunk:
                    acc_w = torch.zeros((v1 - v0, weight.shape[1]), device=dev, dtype=torch.float32)
                for r0 in range(0, n, rows):
                    r1 = min(r0 + rows, n)
                    h_c = hidden[r0:r1].to(cdt)
                    if gemm_grad is not None:  # GEMM + dz epilogue: no float32 logits tile
                        dz = torch.empty((r1 - r0, v1 - v0), device=dev, dtype=dz_dtype)
                        gemm_grad(h_c, w_c, b_t, scale, targets[r0:r1], v0, lse[r0:r1], g[r0:r1], dz)
                    else:
                        z = _mm_fp32(h_c, w_c.t())
                        dz = z if dz_dtype == torch.float32 else torch.empty(z.shape, device=dev, dtype=dz_dtype)
                        unfold(z, b_t, scale, targets[r0:r1], v0, lse[r0:r1], g[r0:r1], dz)
                        del z
                    # (grad_h, grad_w, grad_b are set exactly when needed; acc_w when the rows take several chunks)
                    if grad_h is not None:
                        _addmm_fp32(grad_h[r0:r1], dz, w_c)
                    if grad_w is not None:
                        if acc_w is None:  # single_chunk
                            grad_w[v0:v1] = _mm_fp32(dz.t(), h_c)
                        else:
                            _addmm_fp32(acc_w, dz.t(), h_c)
                    if grad_b is not None:
                        grad_b[v0:v1] += dz.sum(0, dtype=torch.float32)
                if acc_w is not None and grad_w is not None:
                    grad_w[v0:v1] = acc_w
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            *(None,) * 8,
        )


def lm_head_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    *,
    logit_scale: float = 1.0,
    return_collision: bool = False,
    return_collision_logp: bool = False,
    vocab_chunk: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """Per-token (logprobs, entropy[, collision][, collision_logp]) in float32 from hidden [..., H]
    and weight [V, H].

    z = (hidden @ weightᵀ + bias) · logit_scale / temperature;  logprob = z[a] − logsumexp(z),
    entropy = −Σ π log π, collision = Σ π², collision_logp = Σ π² log π with π = softmax(z) (the
    optional ones in this order when their flags are set, all from the same pass over the tiles).
    Log-probs carry gradient to hidden, weight and bias; the others are detached.
    `chunk_size` is the rows per tile and `vocab_chunk` the vocabulary columns per tile (defaults:
    4096 columns, 2^26 elements per tile); [N, V] is never materialised. Under autocast the GEMMs run
    in the autocast dtype with float32 outputs. `backend` is "auto" (Triton on CUDA when available),
    "torch", "triton" or "triton-gemm" (Triton GEMMs with the softmax in their epilogue);
    `return_collision_logp` always runs the PyTorch tile pass (the Triton kernels fold no R).
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [..., H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    vocab, width = weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden's last dim ({hidden.shape[-1]}) must equal weight's H ({width})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must be a floating-point tensor of shape ({vocab},)")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError("targets must be an integer (int64/int32) tensor")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    for name, other in (("weight", weight), ("targets", targets), ("bias", bias)):
        if other is not None and other.device != hidden.device:
            raise ValueError(f"{name} is on {other.device} but hidden is on {hidden.device}")
    temperature, logit_scale = float(temperature), float(logit_scale)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (logit_scale > 0 and logit_scale < float("inf")):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale}")
    lead = targets.shape
    flat_h = hidden.reshape(-1, width)
    flat_t = targets.reshape(-1).long()
    if flat_t.numel() and (int(flat_t.min()) < 0 or int(flat_t.max()) >= vocab):
        raise ValueError(
            f"targets must be in [0, {vocab}), got values in [{int(flat_t.min())}, {int(flat_t.max())}]"
        )
    use = resolve_backend(backend, hidden.device)
    if return_collision_logp:
        use = "torch"  # the Triton kernels do not fold R = Σ e^{2(z−m)}(z−m)
    dev_type = hidden.device.type
    if torch.is_autocast_enabled(dev_type):
        compute_dtype = torch.get_autocast_dtype(dev_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    rows, cols = _tile_shape(flat_h.shape[0], vocab, chunk_size, vocab_chunk)
    outs = _LMHeadLogprobEntropy.apply(  # type: ignore[no-untyped-call]  # torch's Function.apply is unannotated
        flat_h, weight, bias, flat_t, logit_scale / temperature, compute_dtype, rows, cols,
        bool(return_collision), bool(return_collision_logp), use,
    )
    return tuple(t.reshape(lead) for t in outs if t is not None)


# ----------------------------------------------------------------------------------------------
# Hugging Face-style causal LMs, by duck typing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMHeadParams:
    """What `lm_head_logprobs_entropy` needs from a causal LM: logits = (h @ weightᵀ + bias) · logit_scale."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float


def _text_config(model: object) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: not a Hugging Face-style causal LM")
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _unwrap(model: object) -> object:
    """The bare causal LM under PEFT (`get_base_model`) or DDP/FSDP-style (`.module`) wrappers."""
    for _ in range(4):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            break
    return model


def causal_lm_head_params(model: object) -> LMHeadParams:
    """The output projection of a causal LM and the logit scaling its forward applies.

    Reads `get_output_embeddings()` (tied embeddings included) and the config's logit scaling:
    `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier` (Falcon-H1) multiply the logits;
    `logits_scaling` (Granite, MiniCPM3) divides them. Softcapped heads (`final_logit_softcapping`,
    Gemma 2/3) are refused: tanh capping is not a linear scale and would give wrong numbers here.
    """
    model = _unwrap(model)
    cfg = _text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(
            f"{type(model).__name__} applies final_logit_softcapping={cap}; the fused lm head does not "
            "support softcapped logits — disable the fused head for this model"
        )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(model).__name__} has no linear output head (get_output_embeddings().weight [V, H])")
    bias = getattr(head, "bias", None)
    scale = None
    for attr in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(cfg, attr, None) is not None:
            scale = float(getattr(cfg, attr))
            break
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        div = float(cfg.logits_scaling)
        scale = div if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / div
    scale = 1.0 if scale is None else scale
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"{type(model).__name__}: unsupported logit scale {scale} (must be finite and > 0)")
    return LMHeadParams(weight=weight, bias=bias if isinstance(bias, torch.Tensor) else None, logit_scale=scale)


def causal_lm_backbone(model: object) -> torch.nn.Module:
    """The module whose output's `.last_hidden_state` is the final-norm hidden state fed to the head."""
    model = _unwrap(model)
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        return base
    prefix = getattr(model, "base_model_prefix", None)
    sub = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if isinstance(sub, torch.nn.Module):
        return sub
    sub = getattr(model, "model", None)
    if isinstance(sub, torch.nn.Module):
        return sub
    raise ValueError(f"cannot find the backbone of {type(model).__name__} (no base_model / model attribute)")


def causal_lm_hidden_states(
    model: object, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the final norm, before the head): no logits are built."""
    out = causal_lm_backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out:
        hidden = out[0]
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"the backbone of {type(model).__name__} returned no last_hidden_state")
    return hidden
