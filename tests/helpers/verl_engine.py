"""verl's real FSDP training engine in this one CPU process, for the plugin's end-to-end tests
(imported by name: `from verl_engine import ...`; each test module importorskips verl first).

    verl_on_cpu()            context: a 1-rank gloo process group and verl running on the CPU (see below)
    tiny_qwen3(path)         a tiny random Qwen3 saved to `path` (sharpened LM head: entropies spread)
    build_engine(path, ...)  verl's FSDP2 engine for it (`EngineRegistry.new`, fp32, sdpa), initialised
    make_batch(...)          two GRPO groups as verl's actor update receives them (no-padding TensorDict)
    set_micro_batches(data, n), actor_loss(config), full_grads(engine), hf_logprobs_entropy(path, batch)

verl 0.9.1 resolves an accelerator platform and picks an engine class by device; on a machine without
one it falls back to CUDA. The shims below stay in the tests, never in stapo:
  - a CPU platform (`verl.plugin.platform.platform_manager.set_platform`, verl's own override point);
  - `VERL_ENGINE_DEVICE=cuda`: the registry key of the FSDP engine (verl's own override, registry only);
  - verl's HF monkey patch imports trl's `AutoModelForCausalLMWithValueHead` whenever trl is importable,
    which TRL 1.x no longer has: the check is turned off while the engine is built.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial

import torch
from gloo_ranks import free_port


def _cpu_platform():
    from verl.plugin.platform.platform_base import PlatformBase

    class CPUPlatform(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = torch.cpu

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    return CPUPlatform()


@contextlib.contextmanager
def verl_on_cpu():
    """verl on the CPU in this process: a gloo group of one rank (unless one exists), the CPU platform,
    the engine registry key, the trl check; everything restored on exit."""
    import torch.distributed as dist
    import verl.models.transformers.monkey_patch as hf_patch
    from verl.plugin.platform import platform_manager

    saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                               "VERL_ENGINE_DEVICE")}
    saved_platform = platform_manager._current_platform
    saved_trl = hf_patch.is_trl_available
    created = False
    try:
        if not dist.is_initialized():
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
            dist.init_process_group("gloo", rank=0, world_size=1)
            created = True
        os.environ["VERL_ENGINE_DEVICE"] = "cuda"
        platform_manager._current_platform = _cpu_platform()
        hf_patch.is_trl_available = lambda: False
        import verl.workers.engine.fsdp.transformer_impl as fsdp_impl

        saved_device_name, fsdp_impl.device_name = fsdp_impl.device_name, "cpu"
        try:
            yield
        finally:
            fsdp_impl.device_name = saved_device_name
    finally:
        hf_patch.is_trl_available = saved_trl
        platform_manager._current_platform = saved_platform
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if created:
            dist.destroy_process_group()


VOCAB = 96


def tiny_qwen3(path, seed: int = 0, head_scale: float = 12.0, hidden: int = 64, layers: int = 2,
               vocab: int = VOCAB, max_positions: int = 64):
    """A random Qwen3 in `path` (by default 2 layers, hidden 64); the LM head is scaled by `head_scale` so that
    token probabilities and entropies spread over a wide range (a random head gives ~uniform next tokens)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    return path


def build_engine(model_dir, lr: float = 0.0):
    """verl's FSDP2 engine for `model_dir` (fp32 parameters, reduce and buffers; sdpa attention; remove
    padding; no torch.compile, no gradient checkpointing), with AdamW at `lr` and no gradient clipping."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    model_config = HFModelConfig(path=str(model_dir), use_remove_padding=True, load_tokenizer=False,
                                 override_config={"attn_implementation": "sdpa"},
                                 enable_gradient_checkpointing=False)
    engine_config = FSDPEngineConfig(strategy="fsdp2", forward_only=False, use_torch_compile=False,
                                     mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                      "buffer_dtype": "fp32"},
                                     use_dynamic_bsz=False, micro_batch_size_per_gpu=1)
    optimizer_config = FSDPOptimizerConfig(lr=lr, weight_decay=0.0, clip_grad=1e9, lr_warmup_steps=0,
                                           total_training_steps=100)
    model_config.model_type = "language_model"
    engine = EngineRegistry.new(model_type="language_model", backend="fsdp2", model_config=model_config,
                                engine_config=engine_config, optimizer_config=optimizer_config,
                                checkpoint_config=CheckpointConfig())
    engine.initialize()
    return engine


def make_batch(seed: int = 0, groups: int = 2, group_size: int = 4, prompt_len: int = 5, response_len: int = 8,
               vocab: int = VOCAB):
    """`groups` prompts x `group_size` responses in verl's left/right-padded layout (prompts left-padded,
    responses right-padded), binary rewards with GRPO advantages per group. Returns the padded dict
    (for the references) and the no-padding TensorDict the actor update gets (old log-probs added later)."""
    g = torch.Generator().manual_seed(seed)
    bsz = groups * group_size
    prompt_lens = torch.randint(2, prompt_len + 1, (groups,), generator=g).repeat_interleave(group_size)
    response_lens = torch.randint(3, response_len + 1, (bsz,), generator=g)
    prompts = torch.zeros(bsz, prompt_len, dtype=torch.long)
    responses = torch.zeros(bsz, response_len, dtype=torch.long)
    group_prompts = torch.randint(3, vocab, (groups, prompt_len), generator=g)
    for i in range(bsz):
        n = int(prompt_lens[i])
        prompts[i, prompt_len - n:] = group_prompts[i // group_size, :n]
        responses[i, : int(response_lens[i])] = torch.randint(3, vocab, (int(response_lens[i]),), generator=g)
    prompt_mask = (torch.arange(prompt_len)[None, :] >= prompt_len - prompt_lens[:, None]).long()
    response_mask = (torch.arange(response_len)[None, :] < response_lens[:, None]).long()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0] * groups)[:bsz].reshape(groups, group_size)
    adv = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-6)
    advantages = adv.reshape(bsz, 1) * response_mask.float()
    padded = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": torch.cat([prompt_mask, response_mask], dim=1),
        "response_mask": response_mask,
        "advantages": advantages,
    }
    return padded


def to_actor_batch(padded: dict, old_log_probs: torch.Tensor, micro_batch_size: int):
    """The no-padding TensorDict verl's actor update runs (`left_right_2_no_padding`), with the
    non-tensor keys the trainer and the engine worker put on it."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.utils.model import compute_position_id_with_mask
    from verl.workers.utils.padding import left_right_2_no_padding

    bsz = padded["input_ids"].shape[0]
    td = TensorDict(
        {
            **{k: v.clone() for k, v in padded.items()},
            "position_ids": compute_position_id_with_mask(padded["attention_mask"]),
            "old_log_probs": old_log_probs.clone(),
        },
        batch_size=[bsz],
    )
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=1.0, calculate_entropy=True, global_batch_size=bsz, use_remove_padding=True,
                         use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch_size, max_token_len_per_gpu=4096,
                         use_fused_kernels=False, compute_loss=True)
    return td


def actor_loss(config):
    """The actor loss function exactly as verl's engine worker binds it (`engine_workers.py`)."""
    from verl.workers.utils.losses import ppo_loss

    return partial(ppo_loss, config=config)


def full_grads(engine) -> torch.Tensor:
    """Every parameter's gradient, flattened into one vector (FSDP2 DTensors made whole)."""
    parts = []
    for p in engine.module.parameters():
        grad = p.grad
        if grad is None:
            parts.append(torch.zeros(p.numel()))
            continue
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        parts.append(grad.detach().reshape(-1).clone())
    return torch.cat(parts)


def full_params(engine) -> torch.Tensor:
    parts = []
    for p in engine.module.parameters():
        data = p.full_tensor() if hasattr(p, "full_tensor") else p
        parts.append(data.detach().reshape(-1).clone())
    return torch.cat(parts)


def hf_logprobs_entropy(model_dir, padded: dict, dtype=torch.float64):
    """The response tokens' log-probs and the entropies at their positions, [B, R] (0 on padding), from the
    Hugging Face model in `dtype`, one unpadded sequence at a time: the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager")
    model.eval()
    prompts, responses = padded["prompts"], padded["responses"]
    prompt_mask = padded["attention_mask"][:, : prompts.shape[1]].bool()
    response_mask = padded["response_mask"].bool()
    bsz, resp_len = responses.shape
    lp = torch.zeros(bsz, resp_len, dtype=dtype)
    ent = torch.zeros(bsz, resp_len, dtype=dtype)
    with torch.no_grad():
        for i in range(bsz):
            p, r = prompts[i][prompt_mask[i]], responses[i][response_mask[i]]
            ids = torch.cat([p, r])[None]
            logits = model(input_ids=ids).logits[0].to(dtype)
            logp = torch.log_softmax(logits, dim=-1)[len(p) - 1 : len(p) - 1 + len(r)]  # positions predicting r
            lp[i, : len(r)] = logp.gather(-1, r[:, None])[:, 0]
            ent[i, : len(r)] = -(logp.exp() * logp).sum(-1)
    return lp, ent
