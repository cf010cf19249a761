"""`STAPOTrainer`: TRL's GRPO trainer with the loss step of `stapo.core`.

Generation, rewards, advantages, batching, logging and checkpointing are TRL's. What is replaced,
and why (TRL / Trainer private methods in parentheses):

    the loss step            (_compute_loss)  log-probs/entropies -> token filter -> clipped loss -> metrics
    the LM head              (_get_per_token_logps_and_entropies)  stapo's head in TRL's slot (`lm_head.py`)
    step end                 (_clip_grad_norm, _get_grad_norm)  global step metrics, the deferred S2T
                             denominator, the non-finite guard
    checkpoints              (_save_checkpoint, _get_output_dir, _load_optimizer_and_scheduler)  written to
                             a staging directory and published with one rename (`stapo.rundir`)
    vLLM on a CPU            (__init__, _generate_and_score_completions)  TRL's colocated engine made to run on
                             vLLM's CPU build, the rollout log-prob gap (`vllm.py`)
    reward metrics           (_calculate_rewards, _generate_and_score_completions)  accuracy, zero-variance
                             groups, and each row's reward carried with the batch for rollout captures
    rollout captures         a callback (`rollouts.RolloutCaptureCallback`) on the trainer's own events
                             (`events.py`): each training micro-batch's loss step, each step's update decision

Every private symbol of TRL, transformers and vLLM this relies on (these methods, the private attributes
read, the slots `lm_head.py` and `vllm.py` replace) is listed in `internals.py`, checked at import (a
warning naming the symbol) and by tests/engines/trl/test_engine_internals.py.

Optimizer steps with a non-finite forward (log-probs or entropies NaN/inf at a valid position), loss or
gradient norm are skipped, counted and, after `max_nonfinite_steps` in a row, stop the run
(`NonFiniteTrainingError`); a rollout capture of a skipped step is marked `update_skipped`. A resumed run
drops the metrics lines and rollout captures newer than its checkpoint.

The loss of a micro-batch is `stapo.core.filtered_policy_loss` (token filter -> clipped loss ->
aggregation); the engine supplies the tensors and what it knows of the optimizer step the micro-batch
belongs to (`_step_context`, taken at the step's first micro-batch from TRL's buffered slices of the
generation batch):

    loss_type  aggregation                                  denominator
    dapo       token-mean                                   the step's own valid tokens, all processes
                                                            (÷ processes), less S2T's silenced ones
    bnpo       token-mean over the micro-batch, / GA        the micro-batch's own
    grpo       seq-mean-token-mean, num_seqs = B, / GA      local
    dr_grpo    seq-mean-token-sum-norm, horizon = max_completion_length, / GA

`dapo` departs from TRL's `GRPOTrainer` on purpose when steps_per_generation > GA (several optimizer
steps per generation, the paper's layout): TRL divides every step by the generation batch's *average*
tokens per step, which scales steps with more (fewer) tokens than average up (down); stapo takes each
step's own count, the paper's (verl's) token-mean over the PPO mini-batch. When a generation feeds one
step (steps_per_generation = GA, TRL's default) the two are the same.

S2T over the step (where S2T is applied). `tau_h_scope = mini_batch` (the default, the paper's scope):
tau_h and the silenced tokens are taken over the whole optimizer step before its first loss, so the
decision is the same however the step is split and the denominator is exact (`s2t_over_step`). The
values decided on (`decision_policy`):

  * `current` (default; pi_theta, as the paper writes): with several micro-batches per step, one no-grad
    forward over the step's micro-batches at its first one (the policy does not change within a step);
    one micro-batch per step needs none (its decision and silenced count are taken inside its loss,
    over all processes).
  * `old`: pi_old's log-probs and entropies, from the pass TRL already runs while generating when a
    generation feeds several steps (`old_per_token_logps`; its entropies are kept beside them,
    `old_per_token_entropies`): no extra forward. When TRL runs no such pass, pi_old = pi_theta and the
    decision is the current one.

`tau_h_scope = micro_batch` or an absolute tau_h decide per micro-batch on the current policy; with
several micro-batches per step the silenced count is then known only at the step's end: each micro-batch
divides by the step's valid tokens, and before gradient clipping the gradients (and the logged loss) are
multiplied by N_valid / (N_valid - N_masked) — exactly the step's token-mean over its kept tokens (tested).
That needs the gradients in `param.grad`: DeepSpeed is refused in this case. The S2T statistics that
other methods only measure, and 20-Entropy's top-rho (the scope of TRL's own `top_entropy_quantile`),
take their quantiles per micro-batch. A micro-batch with no valid token trains with loss 0.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from stapo.core import (
    ALL_RANKS,
    FilteredLoss,
    FilterParams,
    S2TDecision,
    filtered_policy_loss,
    get_preset,
    nonfinite_positions,
    s2t_over_step,
    tau_h_for_fraction,
    zero_variance_group_fraction,
)
from stapo.core.monitor import PAPER_MASKED_FRACTION, InertS2TMonitor
from stapo.engines.trl.config import STAPOConfig
from stapo.engines.trl.console import install_console
from stapo.engines.trl.events import MICRO_BATCH_LOSS, UPDATE_DECIDED, MicroBatchLoss, notify
from stapo.engines.trl.internals import PER_TOKEN_LOGPS_MULTIMODAL_INPUTS
from stapo.engines.trl.lm_head import stapo_lm_head_in_trl, trl_has_fused_head_slot
from stapo.engines.trl.metrics import MetricsJsonlCallback, TokenStats, reduce_window, window_metrics
from stapo.engines.trl.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from stapo.engines.trl.rollouts import RolloutCaptureCallback
from stapo.engines.trl.vllm import check_vllm_args, cpu_engine_options, record_rollout_gap, use_cpu_weight_sync
from stapo.rundir import (
    TRAINER_STATE_FILE,
    checkpoint_name,
    publish_checkpoint,
    remove_stale_staging,
    resumed_lineage,
    rotate_checkpoints,
    staging_dir,
    truncate_rollouts_after_step,
)

logger = logging.getLogger(__name__)
__all__ = ["OLD_ENTROPY_KEY", "STAPOTrainer", "NonFiniteTrainingError"]

OLD_ENTROPY_KEY = "old_per_token_entropies"  # pi_old's entropies, beside TRL's old_per_token_logps


class STAPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose loss is `stapo.core`'s, with the method's token filter (S2T / 20-Entropy)."""

    args: STAPOConfig  # always (checked in __init__): the Trainer's `args`, with STAPOConfig's fields

    def __init__(self, model, reward_funcs=None, args: STAPOConfig | None = None, *more, **kwargs):
        if args is None:
            args = STAPOConfig()
        if not isinstance(args, STAPOConfig):
            raise ValueError(f"STAPOTrainer needs args=STAPOConfig(...), got {type(args).__name__}")
        check_vllm_args(args)
        with cpu_engine_options(args):  # use_vllm on vLLM's CPU build: see vllm.py
            super().__init__(model, reward_funcs, args, *more, **kwargs)
        use_cpu_weight_sync(self)
        self.preset = get_preset(args.method)
        self.filter_spec = self.preset.filter  # the method's token filter (a TokenFilterSpec): its properties are read
        self._context: _StepContext | None = None  # the current optimizer step, as its micro-batches' losses see it
        self.filter_params = FilterParams(s2t=args.s2t_settings, top_entropy_quantile=self.top_entropy_quantile)
        self._window: TokenStats | None = None
        self._window_loss = 0.0  # global loss sum of the last finished window (non-finite check)
        self._nonfinite = NonFiniteGuard(limit=args.max_nonfinite_steps)
        self._step_skipped = False
        self._nonfinite_positions = 0  # valid positions with a non-finite forward in the current step
        # filled by the old-log-prob pass while generating (decision_policy=old)
        self._old_entropies: list | None = None
        self._inert = InertS2TMonitor(args.s2t_settings)  # warns when S2T silences nothing for K steps
        # the last training micro-batch's (entropies, S2T decision): the inert warning's suggestion
        self._last_decision: tuple[torch.Tensor, S2TDecision] | None = None
        self._staging_run_dir: str | None = None
        self._run_checkpoints: set[int] = set()  # steps this run wrote or resumed from: the only ones rotated
        self.use_stapo_lm_head = self._resolve_fused_lm_head(args.fused_lm_head)
        if self._deferred_denominator() and self.is_deepspeed_enabled:
            raise ValueError(
                "method='stapo' with loss_type='dapo', several micro-batches per step and a tau_h taken per "
                "micro-batch (tau_h_scope='micro_batch' or an absolute tau_h) rescales gradients at the optimizer "
                "step, which DeepSpeed does not expose; use tau_h_scope='mini_batch' or decision_policy='old', "
                "gradient_accumulation_steps=1, or DDP/FSDP"
            )
        if args.metrics_jsonl:
            self.add_callback(MetricsJsonlCallback())
        if args.capture_rollouts_every:
            self.add_callback(RolloutCaptureCallback(
                self.processing_class, self.temperature, args.method, self.filter_spec.applies_s2t,
                self.filter_params.s2t, self.accelerator.is_main_process))
        self.add_callback(_RunDirectoryCallback())
        install_console(self)  # one readable line per logging step instead of the Trainer's dict

    # ---- the loss step ------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        mode = "train" if self._training() else "eval"
        valid = _valid_tokens(inputs)

        # 1. The current policy's per-token log-probs and entropies (TRL's forward, stapo's head if fused_lm_head).
        logps, entropies, aux_loss = self._policy_forward(model, inputs, compute_aux_loss=self.aux_loss_enabled)
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps
        advantages = _token_advantages(inputs, logps)
        decision = self._old_decision_values(inputs) if mode == "train" else (None, None)
        bad = nonfinite_positions(valid, logps, entropies, old_logps, *decision)
        if bad:  # the optimizer step is skipped like one with a non-finite gradient (`_guard_nonfinite`)
            return self._skip_nonfinite_forward(mode, bad, logps, valid)

        # 2. The core step: token filter -> clipped loss -> aggregation, with what the engine knows of the
        # optimizer step (its tau_h, valid and silenced tokens). TRL's vLLM importance weights ride on A.
        context = self._step_context(model, inputs, mode)
        corrected = self.use_vllm and self.vllm_importance_sampling_correction
        weights = inputs["importance_sampling_ratio"] if corrected else None
        shape, divisor = self._aggregation(mode, valid.shape[0])
        out = filtered_policy_loss(
            logps, old_logps, advantages, valid, entropies, self.filter_spec, self.filter_params,
            decision_logprobs=decision[0], decision_entropy=decision[1], step_tau_h=context.step_tau_h,
            num_valid=context.num_valid if shape["agg"] == "token-mean" else None, num_silenced=context.num_silenced,
            token_weights=weights, clip_low=self.epsilon_low, clip_high=self.epsilon_high,
            clip_ratio_c=self.args.clip_ratio_c, **shape,
        )
        loss = out.loss / divisor
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / divisor
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        # 3. Metrics (summed over the optimizer step, reduced at its end); the loss step to the callbacks
        # that take it (rollout captures).
        self._record_tokens(mode, out, entropies, valid, loss)
        if mode == "train":
            self._notify(MICRO_BATCH_LOSS, loss=MicroBatchLoss(model, inputs, logps, entropies, advantages, valid,
                                                                out.s2t))
        return loss

    def _policy_forward(self, model, inputs, compute_aux_loss=False):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=compute_aux_loss,
            **{k: inputs.get(k) for k in PER_TOKEN_LOGPS_MULTIMODAL_INPUTS},
        )

    def _steps_per_generation(self) -> int:
        """TRL's `steps_per_generation` (GRPOConfig fills a None with gradient_accumulation_steps)."""
        return int(self.args.steps_per_generation or self.args.gradient_accumulation_steps)

    def _training(self) -> bool:
        """Whether the model is in training mode (the Trainer's model exists from __init__ on)."""
        assert self.model is not None
        return self.model.training

    def _decides_on_old_policy(self) -> bool:
        """S2T reads pi_old's p and H (`decision_policy = old`) from the old-log-prob pass TRL runs when a
        generation feeds several optimizer steps (or for vLLM's importance weights). Otherwise every step
        is the first after its generation, pi_old = pi_theta, and the decision is the current one."""
        if not (self.filter_spec.applies_s2t and self.filter_params.s2t.decision_policy == "old"):
            return False
        generate_every = self._steps_per_generation() * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction)

    def _old_decision_values(self, inputs):
        """(pi_old's log-probs, entropies) of a micro-batch for the S2T decision, or (None, None)."""
        if not self._decides_on_old_policy():
            return None, None
        return inputs["old_per_token_logps"], inputs[OLD_ENTROPY_KEY]

    def _step_context(self, model, inputs, mode) -> _StepContext:
        """What the loss of each micro-batch needs to know of its whole optimizer step (taken at its first
        micro-batch): the valid tokens (token-mean's denominator; TRL's own `num_items_in_batch` spans the
        generation batch), S2T's tau_h and the tokens it silences, over every micro-batch and process.

        The step's micro-batches are TRL's buffered slices [i, i + GA) of the generation batch. Where the
        decision is on the current policy and a step has several micro-batches, a no-grad forward over them
        gives the values each micro-batch's loss will see (the policy does not change within a step)."""
        processes = self.accelerator.num_processes
        if mode == "eval":  # one micro-batch is the step; TRL counts its tokens over all processes
            return _StepContext(inputs["num_items_in_batch"].float() / processes, None, ALL_RANKS)
        if self._context is not None:
            return self._context
        ga = self.current_gradient_accumulation_steps
        start = self._step % self._steps_per_generation()
        assert self._buffered_inputs is not None  # TRL buffers the generation batch before any loss
        parts = self._buffered_inputs[start : start + ga]
        valid = sum(_valid_tokens(part).sum().float() for part in parts)
        context = _StepContext(self.accelerator.reduce(valid, reduction="sum") / processes, None, None)
        settings = self.filter_params.s2t
        if self.filter_spec.applies_s2t and ga == 1:  # the micro-batch is the step: counted inside the loss
            context.num_silenced = ALL_RANKS
        elif self.filter_spec.applies_s2t and (self._decides_on_old_policy() or (
                settings.tau_h_scope == "mini_batch" and settings.tau_h is None)):
            values = [self._decision_inputs(model, part) for part in parts]
            if not any(nonfinite_positions(v[3], v[0], v[1]) for v in values):  # else the loss skips the step
                step = s2t_over_step(values, settings)  # gathered over every process
                context.step_tau_h, context.num_silenced = step.step_tau_h, step.num_silenced / processes
        self._context = context
        return context

    @torch.no_grad()
    def _decision_inputs(self, model, part):
        """(log-probs, entropies, advantages, valid) of one buffered micro-batch, as S2T decides on them."""
        logps, entropies = self._old_decision_values(part)
        if logps is None:
            logps, entropies, _ = self._policy_forward(model, part)
        return logps, entropies, _token_advantages(part, logps), _valid_tokens(part)

    def _aggregation(self, mode, rows: int) -> tuple[dict, float]:
        """core aggregation kwargs for this micro-batch, and the divisor applied afterwards (GA).
        `dapo` (token-mean) is over the optimizer step's tokens (`_step_context`); the others are local."""
        ga = float(self.current_gradient_accumulation_steps) if mode == "train" else 1.0
        if self.loss_type == "dapo":
            return {"agg": "token-mean"}, 1.0
        if self.loss_type == "bnpo":
            return {"agg": "token-mean"}, ga
        if self.loss_type == "grpo":
            return {"agg": "seq-mean-token-mean", "num_seqs": float(rows)}, ga
        return {"agg": "seq-mean-token-sum-norm", "num_seqs": float(rows),
                "horizon": float(self.args.max_completion_length or 0)}, ga

    def _deferred_denominator(self) -> bool:
        """Whether S2T's silenced tokens of a step can be unknown before its micro-batches' losses (then
        `_finish_window` rescales the step's gradients): several micro-batches, each with its own decision
        on the current policy."""
        settings = self.filter_params.s2t
        per_micro_batch = settings.tau_h_scope == "micro_batch" or settings.tau_h is not None
        return (self.filter_spec.applies_s2t and self.loss_type == "dapo" and per_micro_batch
                and self.args.gradient_accumulation_steps > 1 and not self._decides_on_old_policy())

    def _skip_nonfinite_forward(self, mode, positions: int, logps, valid):
        """A micro-batch whose forward gave NaN/inf at `positions` valid positions: its loss is NaN (so the
        step's loss is, and `_guard_nonfinite` skips the update), its gradient zero."""
        self._nonfinite_positions += positions
        if self._window is None:
            self._window = TokenStats(valid.device, deferred=False)
        self._window.add(valid=valid.sum().float(), micro_batches=1, loss=float("nan"))
        if mode == "eval":
            self._finish_window(None, mode="eval")
        return (logps.nan_to_num() * 0.0).sum() * float("nan")

    # ---- LM head ----------------------------------------------------------------------------

    def _resolve_fused_lm_head(self, requested: bool | None) -> bool:
        """Whether stapo's LM head fills TRL's fused-head slot: None (auto) turns it on unless the model
        softcaps its logits, the run uses DeepSpeed ZeRO-3 or an entropy bonus (the adapter cannot serve
        those); True in those cases is an error."""
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        blockers = []
        if not trl_has_fused_head_slot():
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
        capture = self._old_entropies is not None and not kwargs.get("compute_entropy", False)
        if capture:  # TRL's old-log-prob pass while generating: S2T decides on pi_old's entropies too
            kwargs["compute_entropy"] = True
        if not self.use_stapo_lm_head:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        else:
            with stapo_lm_head_in_trl():
                logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if capture:
            assert self._old_entropies is not None
            self._old_entropies.append(entropies)
            return logps, None, aux
        return logps, entropies, aux

    # ---- metrics ------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_tokens(self, mode, out: FilteredLoss, entropies, valid, loss):
        """Add a micro-batch to the step's sums: the S2T decision's counts and the clipped loss's metrics
        (clip fractions and ratios over the tokens that get gradient, turned back into sums)."""
        if self._window is None:
            self._window = TokenStats(valid.device, deferred=False)
        self._window.deferred |= mode == "train" and out.deferred
        metrics, decision = out.metrics, out.s2t
        n = metrics["num_tokens"]
        self._window.add(
            valid=decision.n_valid,
            masked=decision.n_spurious,
            loss_tokens=n,
            low_prob=decision.n_low_prob,
            candidates=decision.n_candidates,
            low_entropy=decision.n_low_entropy,
            entropy=torch.where(valid, entropies.detach().float(), 0.0).sum(),
            clip_low=metrics["clip_frac_low"] * n,
            clip_high=metrics["clip_frac_high"] * n,
            ratio=metrics["ratio_mean"] * n,
            threshold=metrics["entropy_threshold"],
            micro_batches=1,
            loss=loss.detach(),
        )
        if bool(n > 0):
            self._window.add_ratio_extremes(metrics["ratio_min"], metrics["ratio_max"])
        if mode == "train":
            self._last_decision = (entropies.detach(), decision)
        if mode == "eval":
            self._finish_window(None, mode="eval")

    def _finish_window(self, model, mode: str = "train") -> None:
        """End of an optimizer step: global statistics, the deferred S2T denominator, step metrics."""
        w, self._window = self._window, None
        if mode == "train":
            self._context = None
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
        metrics = window_metrics(g, s2t_applied=self.filter_spec.applies_s2t)
        metrics["stapo/denominator_scale"] = scale
        if self.filter_spec.uses_top_entropy_quantile:
            metrics["stapo/entropy_kept_frac"] = g["loss_tokens"] / max(g["valid"], 1.0)
        step_times = self._metrics[mode].get("step_time") if mode == "train" else None
        if step_times:
            metrics["stapo/tokens_per_s"] = g["valid"] / max(step_times[-1], 1e-9)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if mode == "train":
            self._warn_if_inert(g)

    def _warn_if_inert(self, g) -> None:
        """One warning line when S2T has silenced nothing for `inert_warning_steps` optimizer steps in a row."""
        if not self.filter_spec.applies_s2t or g["valid"] == 0:
            return

        def suggest():  # from this process's last micro-batch: the step's data, not a global quantile
            if self._last_decision is None:
                return None
            entropies, decision = self._last_decision
            return tau_h_for_fraction(entropies, decision.candidates, decision.n_valid, PAPER_MASKED_FRACTION)

        message = self._inert.update(g["masked"], g["valid"], g["low_prob"], g["candidates"],
                                     g["threshold"] / max(g["micro_batches"], 1.0), suggest)
        if message and self.accelerator.is_main_process:
            logger.warning("stapo: %s", message)

    def _clip_grad_norm(self, model):
        self._finish_window(model)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._finish_window(model)  # no-op when _clip_grad_norm already ended the window
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard_nonfinite(model, grad_norm)
        return grad_norm

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._training():
            logs = {**logs, "stapo/nonfinite_steps": float(self._nonfinite.total)}
        return super().log(logs, *args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """stapo's card (base model, method, S2T thresholds, data, steps, held-out results): model_card.py."""
        from stapo.engines.trl.model_card import write_model_card

        write_model_card(self)

    # ---- non-finite steps, checkpoints ---------------------------------------------------------

    def _guard_nonfinite(self, model, grad_norm) -> None:
        """Called once per optimizer step, right before `optimizer.step()` (all processes agree:
        the loss is summed over processes and the gradient norm is global)."""
        loss = self._window_loss
        norm = float(grad_norm) if grad_norm is not None else 0.0
        step = self.state.global_step + 1
        positions = int(self.accelerator.reduce(torch.tensor(float(self._nonfinite_positions),
                                                             device=self.accelerator.device), reduction="sum"))
        self._window_loss, self._nonfinite_positions = 0.0, 0
        finite = False
        try:
            finite = self._nonfinite.check(loss, norm, step, forward_positions=positions)  # raises at the limit
        finally:  # the step's rollout captures are written, marked when its update is skipped
            self._notify(UPDATE_DECIDED, skipped=not finite)
        if finite:
            self._step_skipped = False
            return
        self._step_skipped = True
        # Without gradients the optimizer skips every parameter: no update, no moment or weight-decay change.
        for p in model.parameters():
            p.grad = None
        cause = f"non-finite forward at {positions} valid position(s)" if positions else "non-finite loss or gradient"
        logger.warning(
            "stapo: step %d skipped: %s (loss %s, gradient norm %s); %d skipped so far, %d in a row "
            "(the run stops at %d in a row)", step, cause, loss, norm, self._nonfinite.total,
            self._nonfinite.consecutive, self._nonfinite.limit,
        )

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
                self.state.save_to_json(str(final / TRAINER_STATE_FILE))
            self._run_checkpoints.add(self.state.global_step)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self._run_checkpoints,
                               protect=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        self._nonfinite.load(checkpoint)
        if checkpoint is not None:
            self._run_checkpoints |= resumed_lineage(checkpoint)

    # ---- rewards ------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self._training() else "eval"
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
        old_policy = self._training() and self._decides_on_old_policy()
        self._old_entropies = [] if old_policy else None
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            captured, self._old_entropies = self._old_entropies, None
        if old_policy:  # the first no-grad pass of the policy while generating is TRL's old-log-prob pass
            assert captured  # TRL's old-log-prob pass ran (_decides_on_old_policy says when it does)
            out[OLD_ENTROPY_KEY] = captured[0]
        if self.use_vllm:
            record_rollout_gap(self._metrics["train" if self._training() else "eval"])
        rows = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * rows
        # The scalar reward of each row travels with the batch (shuffled and split with it) for captures.
        out["stapo_rewards"] = self._last_rewards[start : start + rows].to(out["completion_ids"].device)
        return out

    # ---- stapo's callback events (events.py) ----------------------------------------------------

    def _notify(self, event: str, **kwargs) -> None:
        notify(self.callback_handler.callbacks, event, self.args, self.state, self.control, **kwargs)


@dataclass
class _StepContext:
    """One optimizer step as the losses of its micro-batches see it (`STAPOTrainer._step_context`)."""

    num_valid: torch.Tensor | None             # valid tokens of the step, all processes, ÷ processes
    step_tau_h: torch.Tensor | None            # S2T's tau_h of the step (None: each micro-batch's own)
    num_silenced: torch.Tensor | str | None    # S2T-silenced tokens of the step, same share (ALL_RANKS:
                                               # counted in the loss; None: unknown -> deferred rescale)


def _valid_tokens(inputs) -> torch.Tensor:
    mask = inputs["completion_mask"]
    return (mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]).bool()


def _token_advantages(inputs, like: torch.Tensor) -> torch.Tensor:
    advantages = inputs["advantages"]
    return advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(like)


class _RunDirectoryCallback(TrainerCallback):
    """At the start of a run (fresh or resumed at step k): drop rollout captures of steps > k and staging
    directories left by a crash while saving (metrics.jsonl lines are handled by MetricsJsonlCallback)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.path.isdir(args.output_dir):
            truncate_rollouts_after_step(args.output_dir, state.global_step)
            remove_stale_staging(args.output_dir)

