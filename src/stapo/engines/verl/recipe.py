"""The paper's verl runs as data: Hydra overrides for (method, model size).

    python -m stapo.engines.verl.recipe --method stapo --model 8b --data-dir data/verl [--nnodes 2 ...]

prints one override per line (`recipes/verl/run.sh` passes them to `python -m stapo.engines.verl.main`).
The loss settings of each method come from `stapo.core.get_preset` (one source of truth):
  grpo        vanilla loss, clip 0.2 / 0.2, token-mean (verl's dual clip, bound 3)
  20-entropy  gradient only for the top 20% entropy tokens, clip 0.2 / 0.28, token-mean (bound 3)
  justrl      vanilla loss, clip 0.2 / 0.28, token-mean, dual clip bound 10
  stapo       justrl + the S2T mask (the S2TSettings defaults: tau_p, tau_h = an entropy quantile)
Shared JustRL settings: G = 8, lr 1e-6 with 10 warm-up steps, weight decay 0.1, T = 1.0, no KL, no entropy bonus, one update per batch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from stapo.core import get_preset
from stapo.data import BENCHMARKS
from stapo.engines.verl.config import S2T_KEYS, VERL_TAU_H_SCOPE

METHODS = ("grpo", "20-entropy", "justrl", "stapo")


@dataclass(frozen=True)
class ModelSetting:
    hub_id: str
    max_response_length: int
    nnodes: int  # 8-GPU nodes assumed
    tensor_parallel: int  # rollout TP
    micro_batch_tokens: int  # actor ppo_max_token_len_per_gpu (dynamic batch size)


MODELS = {
    "1.7b": ModelSetting("Qwen/Qwen3-1.7B-Base", 8192, 1, 1, 24576),
    "8b": ModelSetting("Qwen/Qwen3-8B-Base", 16384, 2, 2, 24576),
    "14b": ModelSetting("Qwen/Qwen3-14B-Base", 16384, 4, 4, 20480),
}

TRAIN_BATCH_PROMPTS = 256
# JustRL: 256 prompts per rollout batch, 4 optimizer steps of 64 prompts. Several steps per batch make
# the later steps off-policy, which is where the clip ranges (and so the methods) differ.
MINI_BATCH_PROMPTS = 64
GROUP_SIZE = 8
MAX_PROMPT_LENGTH = 1024


def loss_overrides(method: str) -> list[str]:
    """The actor's policy-loss overrides of `method`, from its stapo.core preset."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    p = get_preset(method)
    if p.advantage_scale != "group":
        raise ValueError(f"preset {method!r}: verl's grpo estimator scales by the group std only")
    a = "actor_rollout_ref.actor"
    out = [
        f"{a}.clip_ratio_low={p.clip_low}",
        f"{a}.clip_ratio_high={p.clip_high}",
        f"{a}.loss_agg_mode={p.agg}",
    ]
    if p.clip_ratio_c is not None:  # verl's dual clip applies to every loss; its default bound is 3
        out.append(f"{a}.clip_ratio_c={p.clip_ratio_c}")
    if p.token_filter == "none":
        out.append(f"{a}.policy_loss.loss_mode=vanilla")
    elif p.token_filter == "s2t":
        s2t = replace(p.s2t_settings, tau_h_scope=VERL_TAU_H_SCOPE)  # see VERL_TAU_H_SCOPE
        out.append(f"{a}.policy_loss.loss_mode=stapo")
        for name in S2T_KEYS:
            value = getattr(s2t, name)
            out.append(f"+{a}.policy_loss.stapo.{name}={'null' if value is None else value}")
    elif p.token_filter == "high_entropy":
        out += [
            f"{a}.policy_loss.loss_mode=20-entropy",
            f"+{a}.policy_loss.stapo.top_entropy_quantile={p.top_entropy_quantile}",
        ]
    else:  # pragma: no cover - presets only have these three filters
        raise ValueError(f"preset {method!r}: unknown token filter {p.token_filter!r}")
    return out


def paper_overrides(
    method: str,
    model: str,
    data_dir: str = "data/verl",
    model_path: str | None = None,
    nnodes: int | None = None,
    gpus_per_node: int = 8,
    total_steps: int = 1000,
    experiment: str | None = None,
) -> list[str]:
    """Every override of one paper run (verl's `ppo_trainer` config)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    m = MODELS[model]
    nodes = m.nnodes if nnodes is None else nnodes
    val_files = "[" + ",".join(f"{data_dir}/{b}.parquet" for b in BENCHMARKS) + "]"
    a, r = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    seq_len = MAX_PROMPT_LENGTH + m.max_response_length
    return [
        "algorithm.adv_estimator=grpo",
        "algorithm.norm_adv_by_std_in_grpo=True",
        "algorithm.use_kl_in_reward=False",
        f"data.train_files={data_dir}/train.parquet",
        f"data.val_files={val_files}",
        f"data.train_batch_size={TRAIN_BATCH_PROMPTS}",
        f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
        f"data.max_response_length={m.max_response_length}",
        "data.filter_overlong_prompts=True",
        "data.truncation=error",
        f"actor_rollout_ref.model.path={model_path or m.hub_id}",
        "actor_rollout_ref.model.use_remove_padding=True",
        "actor_rollout_ref.model.enable_gradient_checkpointing=True",
        # JustRL's optimizer, for every method (the presets fix only the loss)
        f"{a}.optim.lr=1e-6",
        f"{a}.optim.lr_warmup_steps=10",
        f"{a}.optim.weight_decay=0.1",
        f"{a}.ppo_mini_batch_size={MINI_BATCH_PROMPTS}",
        f"{a}.ppo_epochs=1",
        f"{a}.use_dynamic_bsz=True",
        f"{a}.ppo_max_token_len_per_gpu={max(m.micro_batch_tokens, seq_len)}",
        f"{a}.use_kl_loss=False",
        f"{a}.entropy_coeff=0",
        *loss_overrides(method),
        f"{r}.name=vllm",
        f"{r}.n={GROUP_SIZE}",
        f"{r}.temperature=1.0",
        f"{r}.top_p=1.0",
        f"{r}.tensor_model_parallel_size={m.tensor_parallel}",
        f"{r}.gpu_memory_utilization=0.7",
        f"{r}.log_prob_use_dynamic_bsz=True",
        f"{r}.log_prob_max_token_len_per_gpu={max(m.micro_batch_tokens, seq_len)}",
        f"{r}.val_kwargs.do_sample=True",
        f"{r}.val_kwargs.temperature=1.0",
        f"{r}.val_kwargs.top_p=1.0",
        f"{r}.val_kwargs.n=4",
        "actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True",
        "reward.custom_reward_function.path=pkg://stapo.rewards",
        "reward.custom_reward_function.name=compute_score",
        "trainer.critic_warmup=0",
        "trainer.logger=[console,tensorboard]",
        "trainer.project_name=stapo",
        f"trainer.experiment_name={experiment or f'{method}-qwen3-{model}'}",
        f"trainer.n_gpus_per_node={gpus_per_node}",
        f"trainer.nnodes={nodes}",
        "trainer.val_before_train=True",
        "trainer.test_freq=50",
        "trainer.save_freq=100",
        f"trainer.total_training_steps={total_steps}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stapo.engines.verl.recipe", description="Print a paper run's verl overrides.")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--data-dir", default="data/verl")
    parser.add_argument("--model-path", default=None, help="local copy of the base model (default: hub id)")
    parser.add_argument("--nnodes", type=int, default=None)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--total-steps", type=int, default=1000)
    args = parser.parse_args(argv)
    for line in paper_overrides(
        args.method, args.model, args.data_dir, args.model_path, args.nnodes, args.gpus_per_node, args.total_steps
    ):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
