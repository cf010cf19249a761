"""Every private symbol of TRL, transformers and vLLM that the TRL engine relies on, in one list.

`STAPOTrainer` overrides nine private methods of TRL's `GRPOTrainer` and transformers' `Trainer`, reads
private attributes they set, and replaces three things for a block or for one trainer: TRL's fused-head
slot (`lm_head.py`), the `LLM` class TRL builds its colocated engine with and a trainer's vLLM weight
sync (`vllm.py`). `INTERNALS` names each one (`stapo.engines.private_symbols.PrivateSymbol`: where it
is looked up, the parameters stapo relies on, what stapo does with it).

`needs` here: "vllm" for what exists only with vLLM (TRL imports vLLM's `LLM` only then; a trainer has
the attribute only with `use_vllm`), "vllm cpu" for what stapo uses only with vLLM's CPU build in
colocate mode (the weight sync, `vllm.py`).

Checked when stapo.engines.trl is imported (`warn_on_changed_internals`: the classes and module slots,
a warning per problem) and in tests/engines/trl/test_engine_internals.py (everything, the attributes of a trainer
after one optimizer step included; the vLLM ones in the vLLM venv through tests/engines/trl/vllm_train_checks.py).
"""

from __future__ import annotations

from typing import Any

from stapo.engines.private_symbols import INSTANCE, PrivateSymbol, symbol_problems, warn_changed

__all__ = ["BATCH_KEYS", "FUSED_HEAD_SLOT", "INTERNALS", "PER_TOKEN_LOGPS_MULTIMODAL_INPUTS", "TRL_ROLLOUT_GAP_METRIC",
           "checked_internals", "internal_problems", "warn_on_changed_internals"]

GRPO = "trl.trainer.grpo_trainer:GRPOTrainer"
TRAINER = "transformers.trainer:Trainer"
VLLM_GENERATION = "trl.generation.vllm_generation:VLLMGeneration"
_VLLM_RUNNER = "vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner"
FUSED_HEAD_SLOT = "_ChunkedLogProbFunction"  # in trl.trainer.utils: the class TRL's fused head calls (lm_head.py)
TRL_ROLLOUT_GAP_METRIC = "sampling/sampling_logp_difference/mean"  # TRL's vLLM-vs-trainer log-prob gap (vllm.py)
# The keys of TRL's batch (built by _generate_and_score_completions) that stapo reads, and the metric above.
BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask", "advantages",
              "old_per_token_logps", "importance_sampling_ratio", "num_items_in_batch", TRL_ROLLOUT_GAP_METRIC)

# The multimodal inputs of TRL's forward, passed through by keyword from the batch (`_policy_forward`).
PER_TOKEN_LOGPS_MULTIMODAL_INPUTS = (
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

INTERNALS: tuple[PrivateSymbol, ...] = (
    # ---- the nine private methods STAPOTrainer overrides (each calls the original) ----
    PrivateSymbol(GRPO, "_compute_loss", ("self", "model", "inputs"), exact=True,
                  use="the loss step: log-probs/entropies -> stapo.core's filtered_policy_loss -> metrics"),
    PrivateSymbol(GRPO, "_get_per_token_logps_and_entropies",
                  ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "compute_entropy",
                   "compute_aux_loss", *PER_TOKEN_LOGPS_MULTIMODAL_INPUTS),
                  use="TRL's forward, called for the loss and the S2T pre-pass; stapo's LM head around it "
                      "(fused_lm_head) and pi_old's entropies kept from TRL's old-log-prob pass"),
    PrivateSymbol(GRPO, "_calculate_rewards", ("self", "inputs", "prompts", "completions", "completion_ids_list"),
                  exact=True, use="accuracy and zero-variance-group metrics; each row's reward kept for captures"),
    PrivateSymbol(GRPO, "_generate_and_score_completions", ("self", "inputs"), exact=True, keys=BATCH_KEYS,
                  use="pi_old's entropies and each row's reward added to the batch; the vLLM rollout gap logged; "
                      "the batch's keys read by the loss step and rollout captures"),
    PrivateSymbol(TRAINER, "_clip_grad_norm", ("self", "model"), exact=True,
                  use="the end of an optimizer step: global step metrics, the deferred S2T denominator"),
    PrivateSymbol(TRAINER, "_get_grad_norm", ("self", "model", "grad_norm"), exact=True,
                  use="the same when gradients are not clipped, then the non-finite guard, before optimizer.step()"),
    PrivateSymbol(TRAINER, "_save_checkpoint", ("self", "model", "trial"), exact=True,
                  use="the checkpoint written into a staging directory and published with one rename"),
    PrivateSymbol(TRAINER, "_get_output_dir", ("self", "trial"), exact=True,
                  use="points the Trainer's checkpoint writing at the staging directory"),
    PrivateSymbol(TRAINER, "_load_optimizer_and_scheduler", ("self", "checkpoint"), exact=True,
                  use="the non-finite guard's counters and the resumed checkpoints restored on resume"),
    # ---- private attributes of a trainer, read (or written) once it trains ----
    PrivateSymbol(INSTANCE, "_buffered_inputs", type="builtins:list",
                  use="the generation batch's micro-batches: an optimizer step is the slices [i, i + GA) "
                      "(its token-mean denominator, S2T over the step)"),
    PrivateSymbol(INSTANCE, "_step", type="builtins:int", use="TRL's micro-batch counter: the step's first slice"),
    PrivateSymbol(INSTANCE, "_metrics", type="builtins:dict",
                  use="TRL's logged metric lists per mode: stapo's step metrics are appended to them"),
    PrivateSymbol(INSTANCE, "_tr_loss", type="torch:Tensor",
                  use="the Trainer's running loss: the deferred S2T denominator rescales the logged loss"),
    PrivateSymbol(INSTANCE, "model.config._name_or_path", type="builtins:str",
                  use="the base model the model card names (model_card.py); transformers' config keeps it"),
    PrivateSymbol(INSTANCE, "_last_loaded_step", type="builtins:int", needs="vllm",
                  use="the step of TRL's last weight sync: SyncAtTrainEnd syncs after the last step unless current"),
    # ---- replaced for a block or for one trainer (lm_head.py, vllm.py), and what the replacements call ----
    PrivateSymbol("trl.trainer.utils", f"{FUSED_HEAD_SLOT}.forward",
                  ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                   "final_logit_softcapping", "logit_scale", "outputs"), exact=True,
                  use="TRL's fused-head slot, looked up at call time: stapo_lm_head_in_trl puts "
                      "TRLChunkedLogProbAdapter (the same apply parameters) in it"),
    PrivateSymbol("trl.generation.vllm_generation", "LLM", ("model", "dtype", "enforce_eager", "kv_cache_memory_bytes"),
                  needs="vllm", use="replaced by a partial with the CPU engine options while TRL builds its engine"),
    PrivateSymbol(VLLM_GENERATION, "sync_weights", ("self",), exact=True,
                  use="replaced per trainer on vLLM's CPU build (one reload_weights); TRL calls it without arguments"),
    PrivateSymbol(VLLM_GENERATION, "_iter_named_params", ("self",),
                  use="the trainer's parameters under vLLM's names, for the CPU build's reload_weights"),
    PrivateSymbol(INSTANCE, f"{_VLLM_RUNNER}.reload_weights", ("weights_iterator", "is_checkpoint_format"),
                  needs="vllm cpu", use="the CPU build's weight sync: every parameter in one call"),
    PrivateSymbol(INSTANCE, f"{_VLLM_RUNNER}.get_model", (), needs="vllm cpu",
                  use="the engine's model, whose tied weights are packed again after a sync"),
    PrivateSymbol(INSTANCE, "vllm_generation.llm.reset_prefix_cache", (), needs="vllm cpu",
                  use="cached prefixes dropped after a sync"),
    PrivateSymbol("vllm.model_executor.layers.quantization.base_config:QuantizeMethodBase",
                  "process_weights_after_loading", ("self", "layer"), needs="vllm",
                  use="a tied LM head's CPU weight packing, run again after a sync (layer.quant_method)"),
)


def _vllm_available() -> bool:
    from trl.import_utils import is_vllm_available  # what TRL imports vLLM's LLM on

    return is_vllm_available()


def _checked(item: PrivateSymbol, trainer: Any) -> bool:
    if item.owner == INSTANCE and trainer is None:
        return False
    if not item.needs:
        return True
    if item.owner != INSTANCE:
        return _vllm_available()
    if not getattr(trainer, "use_vllm", False):
        return False
    if item.needs == "vllm cpu":
        from stapo.engines.trl.vllm import vllm_on_cpu

        generation = getattr(trainer, "vllm_generation", None)  # missing: its symbols unchecked, which the test sees
        return getattr(generation, "mode", None) == "colocate" and vllm_on_cpu()
    return True


def checked_internals(trainer: Any = None) -> tuple[PrivateSymbol, ...]:
    """The symbols of `INTERNALS` that apply here: with vLLM installed, and with `trainer`, its attributes."""
    return tuple(item for item in INTERNALS if _checked(item, trainer))


def internal_problems(trainer: Any = None) -> list[str]:
    """The problems with `INTERNALS` (one line naming each symbol), the attributes of `trainer` (one that has
    trained a step) included when it is given."""
    return symbol_problems(checked_internals(trainer), instance=trainer, instance_name="trainer")


def warn_on_changed_internals() -> list[str]:
    """At import: a `ChangedPrivateSymbolWarning` naming each missing or changed class method or module slot."""
    problems = internal_problems()
    warn_changed("stapo.engines.trl", problems, "stapo/engines/trl/internals.py and docs/training.md")
    return problems
