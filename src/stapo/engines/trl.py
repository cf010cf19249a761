"""The single-node / multi-GPU engine: TRL's GRPO trainer with the STAPO loss from `stapo.core`.

    STAPOConfig(GRPOConfig)    adds `method` (a `stapo.core` preset), the S2T thresholds, metrics and
                               rollout-capture switches; the preset fills TRL's loss options.
    STAPOTrainer(GRPOTrainer)  replaces only `_compute_loss`: per-token log-probs and entropies come
                               from TRL, the mask and the clipped loss from `stapo.core`.

Generation, rewards, advantages, batching, logging and checkpointing are TRL's, with three changes
for reliability (`stapo.engines.trl_state`): checkpoints are published atomically (staging directory
+ rename), a resumed run drops the metrics lines and rollout captures newer than its checkpoint, and
optimizer steps with a non-finite loss or gradient norm are skipped, counted and, after
`max_nonfinite_steps` in a row, stop the run (`NonFiniteTrainingError`).

LM head (`fused_lm_head`). TRL 1.16 patches the model so that its training forward stops at the
hidden states and a chunked head (`trl.trainer.utils._ChunkedLogProbFunction`) turns them into
per-token log-probs and entropies. With `fused_lm_head` on, that slot is filled by
`stapo.core.TRLChunkedLogProbAdapter` (float32 logits, O(rows x vocab chunk) extra memory) for the
duration of each `_get_per_token_logps_and_entropies` call only, so other trainers in the same
process keep TRL's head. None (auto) turns it on unless the model softcaps its logits or the run
uses DeepSpeed ZeRO-3 (the adapter cannot serve those); True in those cases is an error.

Preset -> TRL options (`STAPOConfig.__post_init__`). These TRL fields default to None here, meaning
"take the preset's value"; any value the user passes (even one equal to TRL's default) is kept:

    advantage_scale group | none | batch    -> scale_rewards
    clip_low / clip_high                    -> epsilon / epsilon_high
    agg token-mean                          -> loss_type "dapo" (global token count)
    agg seq-mean-token-sum-norm             -> loss_type "dr_grpo"
    (all presets)                           -> beta = 0 (no KL, no reference model)
    20-entropy's rho                        -> top_entropy_quantile

Loss types and their core aggregation (micro-batch loss; B = micro-batch rows, GA = accumulation steps):

    dapo     token-mean, num_tokens = TRL's normaliser (num_items_in_batch / processes, rescaled
             to one accumulation window)
    bnpo     token-mean over the micro-batch's own tokens, / GA
    grpo     seq-mean-token-mean with num_seqs = B, / GA
    dr_grpo  seq-mean-token-sum-norm with num_seqs = B, horizon = max_completion_length, / GA

STAPO's denominator. The S2T mask needs the current policy's probabilities and entropies, which
exist only inside the loss, one micro-batch at a time; silenced tokens must leave the denominator
(`loss_type="dapo"`: the number of *unmasked* valid tokens over the whole step and all processes).

  * A step made of one micro-batch (gradient_accumulation_steps = steps_per_generation = 1, TRL's
    default, and evaluation): the silenced count is all-reduced inside the loss and the exact
    denominator  num_items_in_batch - masked_global  is used directly.
  * A step made of several micro-batches: each micro-batch uses TRL's normaliser (all valid
    tokens); at the optimizer-step boundary, before gradient clipping, the gradients (and the logged
    loss) are multiplied by N_valid / (N_valid - N_masked), counted over the step on every process.
    Since every micro-batch loss is Σ_unmasked ℓ / D, this gives exactly Σ_unmasked ℓ / D' with
    D' = D (N_valid - N_masked) / N_valid — the single-micro-batch result (tested).
    The multiplication needs the gradients in `param.grad`: DeepSpeed is refused in this case.

`bnpo`, `grpo` need no correction (their denominators are local); `dr_grpo`'s is a constant.

Entropy thresholds (S2T's tau_h quantile, 20-Entropy's top-rho) are quantiles over the valid
tokens of the micro-batch on *every* process (`stapo.core.entropy_quantile` gathers across ranks
when torch.distributed is initialised), the same scope as TRL's own `top_entropy_quantile`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from stapo.core import (
    TRLChunkedLogProbAdapter,
    entropy_quantile,
    get_preset,
    high_entropy_mask,
    policy_loss,
    s2t_mask_with_counts,
    token_logprobs_entropy,
    zero_variance_group_fraction,
)
from stapo.engines.trl_metrics import MetricsJsonlCallback, TokenStats, reduce_window, window_metrics
from stapo.engines.trl_state import NonFiniteGuard, NonFiniteTrainingError
from stapo.rundir import (
    checkpoint_name,
    publish_checkpoint,
    remove_stale_staging,
    resumed_lineage,
    rotate_checkpoints,
    staging_dir,
    truncate_rollouts_after_step,
)

logger = logging.getLogger(__name__)
__all__ = ["STAPOConfig", "STAPOTrainer", "NonFiniteTrainingError", "stapo_lm_head_in_trl"]

# TRL fields a preset sets unless the user set them explicitly.
PRESET_OPTIONS = ("loss_type", "epsilon", "epsilon_high", "scale_rewards", "beta", "top_entropy_quantile")
AGG_TO_LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
# Thresholds used to *measure* what S2T would silence in runs of the other methods.
DIAGNOSTIC_S2T = get_preset("stapo")


def _number(name: str, value, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class STAPOConfig(GRPOConfig):
    """`GRPOConfig` plus the STAPO method switch. See the module docstring for the preset mapping."""

    method: str = field(
        default="stapo",
        metadata={"help": "Method preset: grpo, dapo, dr_grpo, 20-entropy, justrl or stapo (stapo.core.PRESETS)."},
    )
    tau_p: float | None = field(
        default=None, metadata={"help": "S2T probability threshold (None: 0.01; 0 = mask off). Other methods: measured only."}
    )
    tau_h: float | None = field(
        default=None,
        metadata={"help": "S2T absolute entropy threshold in nats; None: use tau_h_quantile. Other methods: measured only."},
    )
    tau_h_quantile: float | None = field(
        default=None,
        metadata={"help": "S2T entropy threshold as a quantile of the valid tokens' entropies (None: preset's 0.05)."},
    )
    # TRL options the preset fills (None = the preset's value).
    loss_type: str | None = field(default=None, metadata={"help": "dapo | bnpo | grpo | dr_grpo (None: preset)."})
    epsilon: float | None = field(default=None, metadata={"help": "Lower clip epsilon (None: preset)."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clip epsilon (None: preset)."})
    scale_rewards: str | None = field(default=None, metadata={"help": "group | batch | none (None: preset)."})
    beta: float | None = field(default=None, metadata={"help": "KL coefficient; must be 0 (None: 0)."})
    top_entropy_quantile: float | None = field(
        default=None, metadata={"help": "20-Entropy's rho (20-entropy only; None: preset's 0.2)."}
    )
    metrics_jsonl: bool = field(
        default=True, metadata={"help": "Append every logged step to <output_dir>/metrics.jsonl."}
    )
    capture_rollouts_every: int = field(
        default=0, metadata={"help": "Capture token-level rollouts every N optimizer steps (0: off)."}
    )
    capture_max_samples: int = field(default=16, metadata={"help": "Completions captured per capture step."})
    fused_lm_head: bool | None = field(
        default=None,
        metadata={
            "help": "Compute log-probs/entropies with stapo's memory-lean LM head in TRL's fused-head slot "
            "(None: auto = on unless the model softcaps logits or DeepSpeed ZeRO-3 is used)."
        },
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={"help": "Stop after this many optimizer steps in a row with a non-finite loss or gradient "
                  "(each such step is skipped)."},
    )

    def __post_init__(self):
        preset = get_preset(self.method)  # ValueError listing the known methods
        self.explicit_options = tuple(name for name in PRESET_OPTIONS if getattr(self, name) is not None)
        defaults = {
            "loss_type": AGG_TO_LOSS_TYPE[preset.agg],
            "epsilon": preset.clip_low,
            "epsilon_high": preset.clip_high,
            "scale_rewards": preset.advantage_scale,
            "beta": 0.0,
            "top_entropy_quantile": preset.top_entropy_quantile if preset.token_filter == "high_entropy" else 1.0,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._check_s2t_fields(preset)
        super().__post_init__()
        self._check_supported(preset)

    def _check_s2t_fields(self, preset) -> None:
        for name in ("tau_p", "tau_h", "tau_h_quantile"):
            _number(name, getattr(self, name))
        if preset.token_filter != "s2t":
            # Other methods do not apply the mask; their thresholds only measure what S2T would
            # silence (logged as stapo/s2t_*), so a comparison's configs can differ only in `method`.
            preset = DIAGNOSTIC_S2T
        if self.tau_p is None:
            self.tau_p = preset.tau_p
        if self.tau_h is None:
            self.tau_h = preset.tau_h
        if self.tau_h_quantile is None:
            self.tau_h_quantile = preset.tau_h_quantile
        if not 0.0 <= self.tau_p < 1.0:
            raise ValueError(f"tau_p must be in [0, 1), got {self.tau_p}")
        if self.tau_h is not None and self.tau_h < 0:
            raise ValueError(f"tau_h must be >= 0 (nats) or None, got {self.tau_h}")
        if not 0.0 <= self.tau_h_quantile <= 1.0:
            raise ValueError(f"tau_h_quantile must be in [0, 1], got {self.tau_h_quantile}")

    def _check_supported(self, preset) -> None:
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {SUPPORTED_LOSS_TYPES} for STAPOTrainer, got {self.loss_type!r}")
        _number("epsilon", self.epsilon, allow_none=False)
        _number("epsilon_high", self.epsilon_high, allow_none=False)
        if self.epsilon < 0 or self.epsilon_high < 0:
            raise ValueError(f"epsilon and epsilon_high must be >= 0, got {self.epsilon}, {self.epsilon_high}")
        if _number("beta", self.beta, allow_none=False) != 0.0:
            raise ValueError(f"beta must be 0 (the GRPO-family methods here use no KL term), got {self.beta}")
        rho = _number("top_entropy_quantile", self.top_entropy_quantile, allow_none=False)
        if preset.token_filter == "high_entropy":
            if not 0.0 < rho <= 1.0:
                raise ValueError(f"top_entropy_quantile must be in (0, 1], got {rho}")
            if self.loss_type == "grpo":
                raise ValueError(
                    "loss_type='grpo' cannot keep 20-Entropy's denominator (all valid tokens); "
                    "use dapo, bnpo or dr_grpo with method='20-entropy'"
                )
        elif rho != 1.0:
            raise ValueError(f"top_entropy_quantile applies only to method='20-entropy' (method is {self.method!r})")
        unsupported = {
            "importance_sampling_level": (self.importance_sampling_level, "token"),
            "delta": (self.delta, None),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold, None),
            "entropy_coef": (self.entropy_coef, 0.0),
            "use_adaptive_entropy": (self.use_adaptive_entropy, False),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"{name}={value!r} is not supported by STAPOTrainer (use {supported!r})")
        for name in ("capture_rollouts_every", "capture_max_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.capture_max_samples < 1:
            raise ValueError(f"capture_max_samples must be >= 1, got {self.capture_max_samples}")
        k = self.max_nonfinite_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"max_nonfinite_steps must be an int >= 1, got {k!r}")
        if self.fused_lm_head is not None and not isinstance(self.fused_lm_head, bool):
            raise ValueError(f"fused_lm_head must be true, false or null (auto), got {self.fused_lm_head!r}")


class STAPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose loss is `stapo.core`'s, with the method's token filter (S2T / 20-Entropy)."""

    def __init__(self, model, reward_funcs=None, args: STAPOConfig | None = None, *more, **kwargs):
        if args is None:
            args = STAPOConfig()
        if not isinstance(args, STAPOConfig):
            raise ValueError(f"STAPOTrainer needs args=STAPOConfig(...), got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        self.preset = get_preset(args.method)
        self.token_filter = self.preset.token_filter
        self._window: TokenStats | None = None
        self._captured: list[dict] = []
        self._window_loss = 0.0  # global loss sum of the last finished window (non-finite check)
        self._nonfinite = NonFiniteGuard(limit=args.max_nonfinite_steps)
        self._step_skipped = False
        self._staging_run_dir: str | None = None
        self._run_checkpoints: set[int] = set()  # steps this run wrote or resumed from: the only ones rotated
        self.use_stapo_lm_head = self._resolve_fused_lm_head(args.fused_lm_head)
        if self._deferred_denominator() and self.is_deepspeed_enabled:
            raise ValueError(
                "method='stapo' with loss_type='dapo' and several micro-batches per step rescales gradients at the "
                "optimizer step, which DeepSpeed does not expose; set gradient_accumulation_steps=1 and "
                "steps_per_generation=1, or use DDP/FSDP"
            )
        if args.metrics_jsonl:
            self.add_callback(MetricsJsonlCallback())
        self.add_callback(_RunDirectoryCallback())

    # ---- LM head ----------------------------------------------------------------------------

    def _resolve_fused_lm_head(self, requested: bool | None) -> bool:
        """Whether stapo's LM head fills TRL's fused-head slot (see the module docstring)."""
        import trl.trainer.utils as trl_utils

        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        blockers = []
        if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
            blockers.append("this TRL version has no fused-head slot (trl.trainer.utils._ChunkedLogProbFunction)")
        if getattr(text_config, "final_logit_softcapping", None) is not None:
            blockers.append("the model softcaps its logits (final_logit_softcapping)")
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
            blockers.append("DeepSpeed ZeRO-3 gathers the head weight only inside TRL's own head")
        if self.args.entropy_coef != 0 or self.args.use_adaptive_entropy:
            blockers.append("an entropy bonus needs a differentiable entropy")
        if requested and blockers:
            raise ValueError(f"fused_lm_head=True is not possible here: {blockers[0]}; set fused_lm_head=false or null")
        use = (not blockers) if requested is None else bool(requested)
        logger.info("stapo: LM head for log-probs/entropies: %s", "stapo (fused_lm_head on)" if use else "TRL's")
        return use

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if not self.use_stapo_lm_head:
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        with stapo_lm_head_in_trl():
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    # ---- denominators -------------------------------------------------------------------------

    def _single_micro_batch_steps(self) -> bool:
        return self.args.gradient_accumulation_steps == 1 and self.args.steps_per_generation == 1

    def _deferred_denominator(self) -> bool:
        return self.token_filter == "s2t" and self.loss_type == "dapo" and not self._single_micro_batch_steps()

    def _aggregation(self, inputs, valid, loss_mask, mode) -> tuple[dict, float]:
        """core aggregation kwargs for this micro-batch, and the divisor applied afterwards (GA)."""
        ga = float(self.current_gradient_accumulation_steps) if mode == "train" else 1.0
        rows = valid.shape[0]
        if self.loss_type == "dapo":
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * ga / self.args.steps_per_generation
            if self.token_filter == "s2t" and (mode == "eval" or self._single_micro_batch_steps()):
                # Exact: the step is this micro-batch (on every process); drop the silenced tokens.
                masked = self.accelerator.reduce((valid & ~loss_mask).sum().float(), reduction="sum")
                normaliser = (inputs["num_items_in_batch"].float() - masked) / self.accelerator.num_processes
            return {"agg": "token-mean", "num_tokens": normaliser}, 1.0
        if self.loss_type == "bnpo":
            counted = loss_mask if self.token_filter == "s2t" else valid
            return {"agg": "token-mean", "num_tokens": counted.sum().float()}, ga
        if self.loss_type == "grpo":
            return {"agg": "seq-mean-token-mean", "num_seqs": float(rows)}, ga
        return {
            "agg": "seq-mean-token-sum-norm",
            "num_seqs": float(rows),
            "horizon": float(self.max_completion_length),
        }, ga

    # ---- the loss -----------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        valid = mask.bool()

        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _MULTIMODAL_KEYS},
        )
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps
        advantages = inputs["advantages"]
        adv_bt = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(logps)
        # TRL multiplies the per-token loss by the vLLM importance weight w >= 0; min(rA, clip(r)A)·w equals
        # min(r·Aw, clip(r)·Aw), so the weight rides on the advantage.
        loss_adv = adv_bt
        if self.use_vllm and self.vllm_importance_sampling_correction:
            loss_adv = adv_bt * inputs["importance_sampling_ratio"].expand_as(adv_bt)

        # Token filter. The S2T statistics are measured for every method (what STAPO would silence).
        s2t = self.args  # for methods without the mask: the diagnostic thresholds
        if s2t.tau_h is not None:
            tau_h = torch.tensor(float(s2t.tau_h), device=logps.device)
        else:
            tau_h = entropy_quantile(entropies, valid, s2t.tau_h_quantile)
        s2t_counts = s2t_mask_with_counts(logps, entropies, adv_bt, valid, tau_p=s2t.tau_p, tau_h=tau_h)
        spurious = s2t_counts.spurious
        if self.token_filter == "s2t":
            loss_mask = valid & ~spurious
        elif self.token_filter == "high_entropy":
            rho = self.top_entropy_quantile
            threshold = entropy_quantile(entropies, valid, 1.0 - rho)
            loss_mask = high_entropy_mask(entropies, valid, rho, threshold=threshold)
        else:
            loss_mask = valid

        agg_kwargs, divisor = self._aggregation(inputs, valid, loss_mask, mode)
        loss, _ = policy_loss(
            logps,
            old_logps,
            loss_adv,
            loss_mask,
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            **agg_kwargs,
        )
        loss = loss / divisor
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / divisor
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._record_tokens(mode, logps, old_logps, entropies, adv_bt, valid, loss_mask, s2t_counts, loss)
        if mode == "train" and self._capture_due():
            self._capture_rollouts(inputs, logps, entropies, adv_bt, valid, spurious, model=model, tau_h=tau_h)
        return loss

    # ---- metrics ------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_tokens(self, mode, logps, old_logps, entropies, adv, valid, loss_mask, s2t_counts, loss):
        if self._window is None:
            self._window = TokenStats(logps.device, deferred=mode == "train" and self._deferred_denominator())
        w = self._window
        v = valid.float()
        ratio = torch.exp(torch.clamp(logps.detach().float() - old_logps.float(), -20.0, 20.0))
        ent = entropies.detach().float()
        w.add(
            valid=v.sum(),
            masked=s2t_counts.n_spurious,
            loss_tokens=loss_mask.sum(),
            low_prob=s2t_counts.n_low_prob,
            low_entropy=s2t_counts.n_low_entropy,
            entropy=(ent * v).sum(),
            clip_low=((ratio < 1 - self.epsilon_low) & (adv < 0) & valid).sum(),
            clip_high=((ratio > 1 + self.epsilon_high) & (adv > 0) & valid).sum(),
            ratio=(ratio * v).sum(),
            threshold=s2t_counts.threshold.double(),
            micro_batches=1,
            loss=loss.detach(),
        )
        if bool(valid.any()):
            w.add_ratio_extremes(ratio[valid].min(), ratio[valid].max())
        if mode == "eval":
            self._finish_window(None, mode="eval")

    def _finish_window(self, model, mode: str = "train") -> None:
        """End of an optimizer step: global statistics, the deferred S2T denominator, step metrics."""
        w, self._window = self._window, None
        if w is None:
            return
        g = reduce_window(w, self.accelerator)
        self._window_loss = g["loss"]
        scale = 1.0
        if w.deferred and g["masked"] > 0 and g["valid"] > g["masked"]:
            scale = g["valid"] / (g["valid"] - g["masked"])
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            if getattr(self, "_tr_loss", None) is not None and math.isfinite(w.get("loss")):
                self._tr_loss += (scale - 1.0) * w.get("loss")
        metrics = window_metrics(g, s2t_applied=self.token_filter == "s2t")
        metrics["stapo/denominator_scale"] = scale
        if self.token_filter == "high_entropy":
            metrics["stapo/entropy_kept_frac"] = g["loss_tokens"] / max(g["valid"], 1.0)
        step_times = self._metrics[mode].get("step_time") if mode == "train" else None
        if step_times:
            metrics["stapo/tokens_per_s"] = g["valid"] / max(step_times[-1], 1e-9)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)

    def _clip_grad_norm(self, model):
        self._finish_window(model)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._finish_window(model)  # no-op when _clip_grad_norm already ended the window
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard_nonfinite(model, grad_norm)
        return grad_norm

    # ---- non-finite steps, checkpoints ---------------------------------------------------------

    def _guard_nonfinite(self, model, grad_norm) -> None:
        """Called once per optimizer step, right before `optimizer.step()` (all processes agree:
        the loss is summed over processes and the gradient norm is global)."""
        loss = self._window_loss
        norm = float(grad_norm) if grad_norm is not None else 0.0
        step = self.state.global_step + 1
        self._window_loss = 0.0
        if self._nonfinite.check(loss, norm, step):  # raises on the max_nonfinite_steps-th in a row
            self._step_skipped = False
            return
        self._step_skipped = True
        # Without gradients the optimizer skips every parameter: no update, no moment or weight-decay change.
        for p in model.parameters():
            p.grad = None
        logger.warning(
            "stapo: step %d skipped: non-finite loss (%s) or gradient norm (%s); %d skipped so far, %d in a row "
            "(the run stops at %d in a row)", step, loss, norm, self._nonfinite.total, self._nonfinite.consecutive,
            self._nonfinite.limit,
        )

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except NonFiniteTrainingError:
            for callback in self.callback_handler.callbacks:  # end the progress bar before the message
                bar = getattr(callback, "training_bar", None)
                if bar is not None:
                    bar.close()
                    callback.training_bar = None
            raise

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.model.training:
            logs = {**logs, "stapo/nonfinite_steps": float(self._nonfinite.total)}
        return super().log(logs, *args, **kwargs)

    def _get_output_dir(self, trial):
        if self._staging_run_dir is not None:  # inside _save_checkpoint: the Trainer writes into staging
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written into a staging directory and published with one rename."""
        if self._step_skipped:
            logger.warning("stapo: no checkpoint at step %d (its update was skipped)", self.state.global_step)
            return
        run_dir = self._get_output_dir(trial)
        name = checkpoint_name(self.state.global_step)
        staging = staging_dir(run_dir, self.state.global_step)
        if self.args.should_save:
            remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        if self.args.should_save:
            self._nonfinite.save(staging / name)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = Path(run_dir) / name
            publish_checkpoint(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and Path(best) == staging / name:
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(final / "trainer_state.json"))
            self._run_checkpoints.add(self.state.global_step)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self._run_checkpoints,
                               protect=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        self._nonfinite.load(checkpoint)
        if checkpoint is not None:
            self._run_checkpoints |= resumed_lineage(checkpoint)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        # accuracy: the fraction of completions with a positive total reward (for a 0/1 correctness
        # reward, the accuracy).
        self._metrics[mode]["stapo/accuracy"].append(float((rewards > 0).float().mean()))
        if group and group > 1 and rewards.numel() % group == 0:
            self._metrics[mode]["stapo/zero_variance_group_frac"].append(
                zero_variance_group_fraction(rewards.float(), group)
            )
        self._last_rewards = rewards  # every process's rows; sliced to this process's below
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        rows = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * rows
        # The scalar reward of each row travels with the batch (shuffled and split with it) for captures.
        out["stapo_rewards"] = self._last_rewards[start : start + rows].to(out["completion_ids"].device)
        return out

    # ---- rollout capture (for `stapo analyze`) ------------------------------------------------

    def _capture_due(self) -> bool:
        every = self.args.capture_rollouts_every
        # Steps are numbered like the logs (1, 2, ...): capture steps 1, 1 + every, 1 + 2·every, ...
        return bool(every) and self.state.global_step % every == 0 and self.accelerator.is_main_process

    @torch.no_grad()
    def _capture_rollouts(self, inputs, logps, entropies, advantages, mask, spurious, model=None, tau_h=None):
        """Write token-level records of up to `capture_max_samples` completions of this process
        (main process only) with `stapo.data.rollouts.write_rollouts`.

        Collision probability Σπ² is recomputed from the logits with `stapo.core.token_logprobs_entropy`
        (one extra no-grad forward of the captured rows, on capture steps only).
        """
        step = self.state.global_step + 1
        if getattr(self, "_captured_step", None) != step:
            self._captured_step, self._captured_count = step, 0
        room = self.args.capture_max_samples - self._captured_count
        if room <= 0:
            return
        try:
            from stapo.data.rollouts import write_rollouts
        except ImportError:  # the writer ships with stapo.data; without it the hook is a no-op
            return
        rows = list(range(min(room, mask.shape[0])))
        collision = self._collision(model, inputs, rows)
        tok = self.processing_class
        records = []
        for j, i in enumerate(rows):
            n = int(mask[i].sum())
            ids = inputs["completion_ids"][i, :n].tolist()
            prompt = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()].tolist()
            records.append(
                {
                    "step": step,
                    "sample": self._captured_count + j,
                    "prompt": tok.decode(prompt, skip_special_tokens=False),
                    "completion": tok.decode(ids, skip_special_tokens=False),
                    "reward": float(inputs["stapo_rewards"][i]) if "stapo_rewards" in inputs else None,
                    "advantage": float(advantages[i, 0]),
                    "token_id": ids,
                    "token_text": [tok.decode([t], skip_special_tokens=False) for t in ids],
                    "logprob": logps[i, :n].float().clamp(max=0.0),
                    "entropy": entropies[i, :n].float(),
                    "collision": collision[j, :n],
                    "s2t": spurious[i, :n],
                }
            )
        self._captured_count += len(rows)
        s2t = self.args
        metadata = {
            "method": self.args.method,
            "s2t_applied": self.token_filter == "s2t",
            "tau_p": s2t.tau_p,
            "tau_h": float(tau_h) if tau_h is not None else s2t.tau_h,
            "tau_h_quantile": s2t.tau_h_quantile,
        }
        write_rollouts(self.args.output_dir, step, records, max_samples=self.args.capture_max_samples, metadata=metadata)

    def _collision(self, model, inputs, rows):
        if model is None or not rows:
            return None
        ids = torch.cat([inputs["prompt_ids"][rows], inputs["completion_ids"][rows]], dim=1)
        attn = torch.cat([inputs["prompt_mask"][rows], inputs["completion_mask"][rows]], dim=1)
        t = inputs["completion_ids"].size(1)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1, :]
        _, _, collision = token_logprobs_entropy(
            logits, inputs["completion_ids"][rows], temperature=self.temperature, return_collision=True
        )
        return collision.float()


class _RunDirectoryCallback(TrainerCallback):
    """At the start of a run (fresh or resumed at step k): drop rollout captures of steps > k and staging
    directories left by a crash while saving (metrics.jsonl lines are handled by MetricsJsonlCallback)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.path.isdir(args.output_dir):
            truncate_rollouts_after_step(args.output_dir, state.global_step)
            remove_stale_staging(args.output_dir)


@contextlib.contextmanager
def stapo_lm_head_in_trl():
    """Within the block, TRL's fused-head slot (`trl.trainer.utils._ChunkedLogProbFunction`, looked up by
    the patched forward at call time) is `stapo.core.TRLChunkedLogProbAdapter`; restored on exit."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = TRLChunkedLogProbAdapter
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = original


_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
