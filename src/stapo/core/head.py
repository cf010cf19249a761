"""Per-token log-probs and entropies from logits, in float32, chunked over rows.

`token_logprobs_entropy(logits [..., V], targets [...])` returns

    logprob_t = z_t[a_t]/T − logsumexp(z_t/T)        (differentiable w.r.t. logits)
    H_t       = −Σ_v π_v log π_v                       (detached)
    Σ_v π_v²  (collision probability, optional)       (detached)
    Σ_v π_v² log π_v  (optional)                       (detached; for stats.entropy_change_first_order)

A custom autograd function keeps memory lean: only one [chunk, V] float32 block is alive at a
time in the forward *and* in the backward (which recomputes the softmax per chunk), whatever the
input dtype. The head that starts from hidden states (and never builds [N, V] logits) is
`stapo.core.lm_head_logprobs_entropy`.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_CHUNK_ROWS = 1024


def _chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    # ~256 MB of float32 per block: big enough to keep matmul-free kernels efficient.
    return max(1, min(n_rows, (1 << 26) // max(vocab, 1), DEFAULT_CHUNK_ROWS * 8))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 for half/float inputs; float64 stays float64 (references and finite differences).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _LogitsLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int, want_collision: bool,
        want_collision_logp: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        n, _ = logits.shape
        dt = _compute_dtype(logits)
        logprobs = torch.empty(n, dtype=dt, device=logits.device)
        entropy = torch.empty_like(logprobs)
        collision = torch.empty_like(logprobs) if want_collision else None
        collision_logp = torch.empty_like(logprobs) if want_collision_logp else None
        lse_all = torch.empty_like(logprobs)
        for s in range(0, n, chunk):
            z = logits[s : s + chunk].to(dt)
            if temperature != 1.0:
                z = z / temperature
            lse = torch.logsumexp(z, dim=-1)
            logp = z - lse[:, None]
            p = logp.exp()
            logprobs[s : s + chunk] = logp.gather(1, targets[s : s + chunk, None]).squeeze(1)
            entropy[s : s + chunk] = -(p * logp).sum(-1)
            if collision is not None:  # want_collision
                collision[s : s + chunk] = (p * p).sum(-1)
            if collision_logp is not None:  # want_collision_logp
                collision_logp[s : s + chunk] = (p * p * logp).sum(-1)
            lse_all[s : s + chunk] = lse
        ctx.save_for_backward(logits, targets, lse_all)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        ctx.mark_non_differentiable(*(t for t in (collision, collision_logp) if t is not None))
        return logprobs, entropy, collision, collision_logp

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor | None, _grad_entropy: torch.Tensor | None,
        _grad_collision: torch.Tensor | None, _grad_collision_logp: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        logits, targets, lse_all = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits)
        g_all = grad_logprobs.to(lse_all.dtype) if grad_logprobs is not None else torch.zeros_like(lse_all)
        for s in range(0, logits.shape[0], chunk):
            z = logits[s : s + chunk].to(lse_all.dtype)
            if t != 1.0:
                z = z / t
            # d logprob / dz = (onehot(a) - softmax(z/T)) / T
            g = -(z - lse_all[s : s + chunk, None]).exp()
            g.scatter_add_(1, targets[s : s + chunk, None], torch.ones_like(g[:, :1]))
            g *= g_all[s : s + chunk, None] / t
            grad[s : s + chunk] = g.to(grad.dtype)
        return grad, None, None, None, None, None


def token_logprobs_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_collision: bool = False,
    return_collision_logp: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-token (logprobs, entropy[, collision][, collision_logp]) in float32 (float64 for float64
    input) from logits [..., V] and targets [...].

    collision = Σ_v π_v², collision_logp = Σ_v π_v² log π_v (each returned when its flag is set, in
    this order; both are what `stapo.core.entropy_change_first_order` needs besides log-prob and
    entropy). Log-probs carry gradient to `logits`; the others are detached. Rows are processed in
    chunks of `chunk_size` (default: ~256 MB of float32 per block), all outputs in the same pass.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        raise ValueError("logits must be a floating tensor [..., V]")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError("targets must be an integer tensor")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    lead = targets.shape
    flat = logits.reshape(-1, vocab)
    tgt = targets.reshape(-1).long()
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= vocab):
        raise ValueError(f"targets must be in [0, {vocab}), got values in [{int(tgt.min())}, {int(tgt.max())}]")
    chunk = _chunk_rows(flat.shape[0], vocab, chunk_size)
    outs = _LogitsLogprobEntropy.apply(  # type: ignore[no-untyped-call]  # torch's Function.apply is unannotated
        flat, tgt, float(temperature), chunk, bool(return_collision), bool(return_collision_logp)
    )
    return tuple(t.reshape(lead) for t in outs if t is not None)
