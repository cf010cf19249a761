"""The paper's verl runs as data: Hydra overrides for (method, model size).

    python -m stapo.engines.verl.recipe --method stapo --model 8b --data-dir data/verl [--nnodes 2 ...]

prints one override per line (`recipes/verl/run.sh` passes them to `python -m stapo.engines.verl.main`).
Two sources, nothing else: the shared setup and the evaluation are `stapo.paper_setup` (the paper's
table: 256 prompts x 8, mini-batch 64, prompt 1k / response 15k, AdamW lr 1e-6 constant after 10
warm-up steps, grad clip 1.0, T 1.0 / top-p 1.0, no KL, no entropy bonus, no dynamic sampling), and
each method's loss is its `stapo.core.get_preset`:
  grpo        vanilla loss, clip 0.2 / 0.2, token-mean (verl's dual clip, bound 3)
  20-entropy  gradient only for the top 20% entropy tokens, clip 0.2 / 0.28, token-mean (bound 3)
  justrl      vanilla loss, clip 0.2 / 0.28, token-mean, dual clip bound 10
  stapo       justrl + the S2T mask (the paper's rule, stapo.core.S2TSettings: tau_p 0.002, tau_h = the
              75% entropy quantile of the candidates, no cap; over the scope the plugin provides,
              VERL_TAU_H_SCOPE: the paper's PPO mini-batch)
Where verl cannot follow the table: the in-run validation (one n for every benchmark, the training's
response limit; the paper's protocol is `stapo eval` on merged checkpoints, recipes/verl/README.md),
and verl's dual clip, which applies to every loss.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from stapo.core import get_preset
from stapo.data import BENCHMARKS
from stapo.engines.verl.config import LOSS_MODE_FILTERS, S2T_KEYS, VERL_TAU_H_SCOPE
from stapo.paper_setup import EVAL, TRAINING
from stapo.paper_setup import MODELS as PAPER_MODELS

METHODS = ("grpo", "20-entropy", "justrl", "stapo")


@dataclass(frozen=True)
class ModelSetting:
    hub_id: str
    nnodes: int  # 8-GPU nodes assumed
    tensor_parallel: int  # rollout TP
    micro_batch_tokens: int  # actor ppo_max_token_len_per_gpu (dynamic batch size)
    max_response_length: int = TRAINING.max_response_length  # the paper's 15k, for every size


MODELS = {
    "1.7b": ModelSetting(PAPER_MODELS["1.7b"], 1, 1, 24576),
    "8b": ModelSetting(PAPER_MODELS["8b"], 2, 2, 24576),
    "14b": ModelSetting(PAPER_MODELS["14b"], 4, 4, 20480),
}

# verl counts prompts: data.train_batch_size and ppo_mini_batch_size are prompts (x rollout.n responses).
# 256 / 64 = 4 optimizer steps per rollout batch; the later ones are off-policy, which is where the
# clip ranges (and so the methods) differ.
TRAIN_BATCH_PROMPTS = TRAINING.train_batch_prompts
MINI_BATCH_PROMPTS = TRAINING.mini_batch_prompts
GROUP_SIZE = TRAINING.responses_per_prompt
MAX_PROMPT_LENGTH = TRAINING.max_prompt_length

# verl's policy-loss mode for each registered token filter (stapo.core.TOKEN_FILTERS): verl's own
# `vanilla` where no token is left out of the gradient, else the plugin's loss for that filter (the
# inverse of stapo.engines.verl.config.LOSS_MODE_FILTERS). What else a loss needs comes from the filter's
# properties (applies_s2t: the S2T settings; uses_top_entropy_quantile: rho).
VERL_LOSS_MODES = {"none": "vanilla", **{name: mode for mode, name in LOSS_MODE_FILTERS.items()}}

# In-run validation (verl's val_kwargs take one n for every benchmark): the N of the large benchmarks,
# under the training-aligned setting; responses are capped at data.max_response_length, the training's.
VAL_SAMPLES = min(EVAL.samples.values())
VAL_TEMPERATURE, VAL_TOP_P = EVAL.settings["train"]


def _value(value) -> str:
    """A value in Hydra's override grammar (None -> null; inf stays `inf`, which Hydra reads as a float)."""
    return "null" if value is None else str(value)


def loss_overrides(method: str) -> list[str]:
    """The actor's policy-loss overrides of `method`, from its stapo.core preset."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    p = get_preset(method)
    if p.advantage_scale != "group":
        raise ValueError(f"preset {method!r}: verl's grpo estimator scales by the group std only")
    spec = p.filter
    if spec.name not in VERL_LOSS_MODES:
        raise ValueError(f"preset {method!r}: token filter {spec.name!r} has no verl loss mode "
                         f"(known: {', '.join(VERL_LOSS_MODES)})")
    a = "actor_rollout_ref.actor"
    out = [
        f"{a}.clip_ratio_low={p.clip_low}",
        f"{a}.clip_ratio_high={p.clip_high}",
        f"{a}.loss_agg_mode={p.agg}",
    ]
    if p.clip_ratio_c is not None:  # verl's dual clip applies to every loss; its default bound is 3
        out.append(f"{a}.clip_ratio_c={p.clip_ratio_c}")
    out.append(f"{a}.policy_loss.loss_mode={VERL_LOSS_MODES[spec.name]}")
    if spec.applies_s2t:
        s2t = replace(p.s2t_settings, tau_h_scope=VERL_TAU_H_SCOPE)  # see VERL_TAU_H_SCOPE
        out += [f"+{a}.policy_loss.stapo.{name}={_value(getattr(s2t, name))}" for name in S2T_KEYS]
    if spec.uses_top_entropy_quantile:
        out.append(f"+{a}.policy_loss.stapo.top_entropy_quantile={p.top_entropy_quantile}")
    return out


def paper_overrides(
    method: str,
    model: str,
    data_dir: str = "data/verl",
    model_path: str | None = None,
    nnodes: int | None = None,
    gpus_per_node: int = 8,
    total_steps: int = TRAINING.training_steps,
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
        "algorithm.use_kl_in_reward=False",  # no KL, in the reward or (below) in the loss
        "algorithm.filter_groups.enable=False",  # no dynamic sampling, for every method
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
        # the table's optimizer, for every method (the presets fix only the loss); verl steps the
        # schedule once per training step, so the warm-up is 10 rollout batches
        f"{a}.optim.optimizer={TRAINING.optimizer}",
        f"{a}.optim.lr={TRAINING.learning_rate}",
        f"{a}.optim.lr_scheduler_type={TRAINING.lr_schedule}",
        f"{a}.optim.lr_warmup_steps={TRAINING.warmup_steps}",
        f"{a}.optim.weight_decay={TRAINING.weight_decay}",
        f"{a}.optim.clip_grad={TRAINING.grad_clip}",
        f"{a}.ppo_mini_batch_size={MINI_BATCH_PROMPTS}",
        f"{a}.ppo_epochs={TRAINING.ppo_epochs}",
        f"{a}.use_dynamic_bsz=True",
        f"{a}.ppo_max_token_len_per_gpu={max(m.micro_batch_tokens, seq_len)}",
        f"{a}.use_kl_loss=False",
        f"{a}.entropy_coeff={TRAINING.entropy_coef}",
        *loss_overrides(method),
        f"{r}.name=vllm",
        f"{r}.n={GROUP_SIZE}",
        f"{r}.temperature={TRAINING.temperature}",
        f"{r}.top_p={TRAINING.top_p}",
        f"{r}.tensor_model_parallel_size={m.tensor_parallel}",
        f"{r}.gpu_memory_utilization=0.7",
        f"{r}.log_prob_use_dynamic_bsz=True",
        f"{r}.log_prob_max_token_len_per_gpu={max(m.micro_batch_tokens, seq_len)}",
        f"{r}.val_kwargs.do_sample=True",
        f"{r}.val_kwargs.temperature={VAL_TEMPERATURE}",
        f"{r}.val_kwargs.top_p={VAL_TOP_P}",
        f"{r}.val_kwargs.n={VAL_SAMPLES}",
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
        f"trainer.test_freq={EVAL.every_steps}",
        "trainer.save_freq=100",
        f"trainer.total_training_steps={total_steps}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stapo.engines.verl.recipe",
                                     description="Print a paper run's verl overrides.")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--data-dir", default="data/verl")
    parser.add_argument("--model-path", default=None, help="local copy of the base model (default: hub id)")
    parser.add_argument("--nnodes", type=int, default=None)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--total-steps", type=int, default=TRAINING.training_steps,
                        help=f"training steps = rollout batches (default: {TRAINING.training_steps})")
    args = parser.parse_args(argv)
    for line in paper_overrides(
        args.method, args.model, args.data_dir, args.model_path, args.nnodes, args.gpus_per_node, args.total_steps
    ):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
