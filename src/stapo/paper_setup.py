"""The STAPO paper's experimental setup as one table: training, evaluation, and each method's own settings.

Source: STAPO (arXiv 2602.15620), the appendix hyper-parameter table and its evaluation section. The
paper configs (`stapo/configs/paper/*.yaml`, TRL) and the verl recipe (`stapo.engines.verl.recipe`)
follow this table; `tests/test_paper_setup.py` reads every one of them and compares it with the values
here. Plain data: it imports nothing from stapo, so any layer above `stapo.core` may read it (the
core does not).

Units. A *training step* is one rollout batch (`TRAINING.train_batch_prompts` prompts x
`responses_per_prompt`), as in verl, which the paper trained with: verl steps its learning-rate
schedule once per training step, after the batch's `optimizer_steps_per_rollout` mini-batch updates.
TRL counts optimizer steps (one per mini-batch), so its `warmup_steps` and `max_steps` are these
numbers times `TRAINING.optimizer_steps_per_rollout` (`trl_steps`).

Readings (where the paper's words admit more than one):
  max response "15k"    15 x 1024 = 15,360 tokens; with the 1k (1,024) prompt, a 16,384-token context
  eval "max length"     20,480 generated tokens per sample (the completion limit, `stapo eval
                        --max-new-tokens`), longer than training's 15,360
  "both" sampling       (T 1.0, top-p 1.0), the training-aligned one, and (T 0.7, top-p 0.9): `stapo eval
                        --setting both` (its `train` and `nucleus` settings)
  weight decay          not in the paper's table ("AdamW"); 0.1, JustRL's script's, for every method
  training steps        not a hyper-parameter of the paper (its 1.7B curves run past 3,000 steps, 5-7
                        days on 64 H20s); 1,000 training steps is this project's budget
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "EVAL",
    "EvalProtocol",
    "METHODS",
    "MODELS",
    "MethodSetting",
    "TRAINING",
    "TRL_GPUS",
    "TrainingSetup",
    "eval_args",
    "trl_steps",
]


@dataclass(frozen=True)
class TrainingSetup:
    """The training setup every method shares (the paper's appendix table unless a comment says otherwise)."""

    dataset: str = "DAPO-Math-17k"
    reward: str = "binary outcome reward (DAPO's rule-based verifier)"
    train_batch_prompts: int = 256
    responses_per_prompt: int = 8  # rollout n, the group size G
    mini_batch_prompts: int = 64  # PPO mini-batch: one optimizer step
    ppo_epochs: int = 1  # each mini-batch is used once: 256 / 64 = 4 optimizer steps per rollout batch
    # The paper's micro-batch (1 response per GPU) is a memory setting: the loss's denominators and
    # S2T's tau_h quantile are taken over the mini-batch, so the engines pick their own micro-batches.
    micro_batch_responses_per_gpu: int = 1
    max_prompt_length: int = 1024  # "1k"
    max_response_length: int = 15360  # "15k"
    clip_low: float = 0.2  # clip [1 - 0.2, 1 + 0.28] = [0.8, 1.28]
    clip_high: float = 0.28
    grad_clip: float = 1.0  # max gradient norm
    optimizer: str = "AdamW"
    learning_rate: float = 1e-6
    lr_schedule: str = "constant"  # after the warm-up
    warmup_steps: int = 10  # training steps (rollout batches); TRL: trl_steps(warmup_steps) optimizer steps
    weight_decay: float = 0.1  # not in the paper's table: JustRL's script's
    temperature: float = 1.0  # rollouts
    top_p: float = 1.0
    kl_coef: float = 0.0  # no KL term (loss or reward), no reference model
    entropy_coef: float = 0.0  # no entropy bonus
    dynamic_sampling: bool = False  # for every method, 20-Entropy (a DAPO-based method) included
    rollout_importance_correction: bool = False  # no importance weights for the rollout engine's mismatch
    training_steps: int = 1000  # not the paper's: this project's budget (see the module docstring)

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.train_batch_prompts // self.mini_batch_prompts * self.ppo_epochs

    @property
    def rollout_responses(self) -> int:
        return self.train_batch_prompts * self.responses_per_prompt

    @property
    def mini_batch_responses(self) -> int:
        return self.mini_batch_prompts * self.responses_per_prompt

    @property
    def max_sequence_length(self) -> int:
        return self.max_prompt_length + self.max_response_length


@dataclass(frozen=True)
class EvalProtocol:
    """The paper's evaluation: avg@k over `samples[b]` completions per problem, both sampling settings."""

    samples: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({
        "aime24": 32, "aime25": 32, "amc23": 32,  # the small sets: N = 32
        "math500": 4, "minerva": 4, "olympiadbench": 4,  # N = 4
    }))
    max_new_tokens: int = 20480
    # name -> (temperature, top_p); `stapo eval`'s settings of these names (stapo.eval.protocol.SETTINGS),
    # its default k per benchmark and its "both" group are built from this table
    settings: Mapping[str, tuple[float, float]] = field(default_factory=lambda: MappingProxyType({
        "train": (1.0, 1.0),
        "nucleus": (0.7, 0.9),
    }))
    setting_group: str = "both"  # `stapo eval --setting both` = train + nucleus
    every_steps: int = 20  # training curves: a validation every 20 training steps
    # The paper corrects the rule-based grades with CompassVerifier-3B (an LLM verifier); stapo grades
    # with its rule-based math reward only.
    grader: str = "rule-based (stapo.rewards); the paper adds CompassVerifier-3B"


@dataclass(frozen=True)
class MethodSetting:
    """One method's own settings: its loss (they agree with its `stapo.core` preset, tested) and where
    and why it departs from the shared `TRAINING` table."""

    clip_low: float
    clip_high: float
    clip_ratio_c: float | None  # dual-clip bound for A < 0; None: none
    token_filter: str  # the registered name in stapo.core.TOKEN_FILTERS
    agg: str = "token-mean"  # loss aggregation (stapo.core.aggregate)
    top_entropy_quantile: float | None = None  # 20-Entropy's rho
    s2t_reading: str | None = None  # a name in stapo.core.S2T_READINGS when S2T is applied
    source: str = ""
    differences: tuple[str, ...] = ()  # "what: why", one per departure from TRAINING


TRAINING = TrainingSetup()
EVAL = EvalProtocol()

# The STAPO paper runs the baselines "with the parameter settings of their original papers": each
# method's own hyper-parameters (clip range, dual clip, token filter) from its paper, on the shared
# setup above (data, batch, lengths, optimizer, sampling, no KL / entropy bonus / dynamic sampling).
METHODS: Mapping[str, MethodSetting] = MappingProxyType({
    "stapo": MethodSetting(
        0.2, 0.28, 10.0, "s2t", s2t_reading="paper",
        source="STAPO: JustRL's objective plus the S2T mask (tau_p 0.002, tau_h = the 75% entropy quantile of "
        "the candidates per PPO mini-batch, no cap), loss renormalised over the unmasked tokens",
    ),
    "justrl": MethodSetting(
        0.2, 0.28, 10.0, "none",
        source="JustRL (arXiv 2512.16649): plain GRPO, binary reward, clip [0.8, 1.28]; its public verl script's "
        "dual clip c = 10. Its paper's table is the shared one (256 x 8, mini-batch 64, 1k / 15k, lr 1e-6, "
        "T 1.0), so it departs from nothing",
    ),
    "grpo": MethodSetting(
        0.2, 0.2, None, "none",
        source="GRPO (DeepSeekMath, arXiv 2402.03300): group-std advantages, PPO's symmetric clip",
        differences=(
            "clip [0.8, 1.2] instead of [0.8, 1.28]: GRPO's own (PPO's symmetric epsilon 0.2); the 0.28 upper "
            "bound is DAPO's clip-higher, which GRPO predates",
            "no dual clip: GRPO has none (verl applies its default bound 3 to every loss; the TRL engine none)",
            "no KL term (GRPO's paper: beta 0.04): the STAPO paper uses none for any method",
            "token-level aggregation (GRPO's paper takes the mean per sequence first, DAPO's token-level "
            "mean is used here): the grpo preset's, as every method's, so grpo differs from justrl only in "
            "the clip range and the dual clip",
        ),
    ),
    "20-entropy": MethodSetting(
        0.2, 0.28, None, "high_entropy", top_entropy_quantile=0.2,
        source="Beyond the 80/20 rule (arXiv 2506.01939): policy gradient only for the top rho = 20% "
        "highest-entropy tokens of the batch, on DAPO's loss (clip-higher 0.28, token-level aggregation); "
        "the denominator keeps every valid token",
        differences=(
            "gradient only for the top 20% entropy tokens (rho 0.2, its paper's): the method itself",
            "no dual clip: its paper (DAPO-based) has none (verl applies its default bound 3 to every loss)",
            "the rest of its paper's DAPO recipe (dynamic sampling, overlong reward shaping, its own batch "
            "sizes and 20k responses) is not taken: the STAPO paper runs every method on the shared setup, "
            "without dynamic sampling",
        ),
    ),
})

MODELS: Mapping[str, str] = MappingProxyType({
    "1.7b": "Qwen/Qwen3-1.7B-Base",
    "8b": "Qwen/Qwen3-8B-Base",
    "14b": "Qwen/Qwen3-14B-Base",
})

# The TRL paper configs are laid out for one 8-GPU node (`accelerate launch --num_processes 8`); the
# paper itself trained on 64 GPUs. The batch arithmetic is per optimizer step, not per GPU:
# per_device_train_batch_size x TRL_GPUS x gradient_accumulation_steps = TRAINING.mini_batch_responses.
TRL_GPUS = 8


def trl_steps(training_steps: int) -> int:
    """Training steps (rollout batches) as TRL optimizer steps (TRL's `warmup_steps`, `max_steps`, ...)."""
    return training_steps * TRAINING.optimizer_steps_per_rollout


def eval_args() -> list[str]:
    """The `stapo eval` options of the paper's protocol (k per benchmark is `stapo eval`'s default)."""
    return ["--setting", EVAL.setting_group, "--max-new-tokens", str(EVAL.max_new_tokens)]

