"""Every symbol of verl that the plugin relies on beyond verl's documented extension points, in one list.

verl's documented points are the policy-loss registry (`register_policy_loss`), `PolicyLossConfig` and the
`verl.plugins` entry point. Everything else the plugin uses is verl's internal structure: the engine's
per-mini-batch call it wraps, the functions it calls to split and unpad a mini-batch, the shape of the
loss function the engine worker binds, the keys of the data, the driver's old-log-prob pass it wraps and
the entry point under Hydra's wrapper. `INTERNALS` names each one
(`stapo.engines.private_symbols.PrivateSymbol`: where it is looked up, the parameters and keys the plugin
relies on, what it does with them).

Checked when each owning verl module is first imported (`engine_hook.py` watches them; a module already
imported is checked when the plugin is), a warning naming each missing or changed symbol; and in
tests/engines/verl/test_verl_internals.py (the engine's attributes on verl's real FSDP engine in
tests/engines/verl/test_verl_engine.py).
"""

from __future__ import annotations

from stapo.engines.private_symbols import INSTANCE, PrivateSymbol, symbol_problems, warn_changed

__all__ = ["DRIVER_ENTROPY_KEY", "INTERNALS", "engine_problems", "internal_modules", "internal_problems",
           "warn_on_changed_internals"]

ENGINE = "verl.workers.engine.base:BaseEngine"
TENSORDICT_UTILS = "verl.utils.tensordict_utils"
# The entropies of the driver's old-log-prob pass, in the batch it returns (logged, then dropped by verl).
DRIVER_ENTROPY_KEY = "entropys"

INTERNALS: tuple[PrivateSymbol, ...] = (
    PrivateSymbol(ENGINE, "train_batch", ("self", "data", "loss_function"), exact=True,
                  use="wrapped (engine_hook.py): every verl engine's one call per PPO mini-batch; each micro-batch's "
                      "loss call gets its entropies, S2T's mini-batch pre-pass runs first"),
    PrivateSymbol(ENGINE, "infer_batch", ("self", "data", "loss_function"),
                  use="S2T's forward-only pre-pass over the mini-batch (the training pass's micro-batches)"),
    PrivateSymbol(ENGINE, "get_data_parallel_group", ("self",),
                  use="the data-parallel ranks S2T's mini-batch threshold and silenced count are gathered over"),
    PrivateSymbol(INSTANCE, "ulysses_sequence_parallel_size", type="builtins:int",
                  use="the FSDP engine's sequence-parallel size, set on the mini-batch before counting its "
                      "micro-batches"),
    PrivateSymbol("verl.workers.engine.utils", "prepare_micro_batches", ("data", "dp_group", "same_micro_num_in_dp"),
                  keys=("use_dynamic_bsz", "force_group_size", "micro_batch_size_per_gpu"),
                  use="how many micro-batches the engine splits a mini-batch into (the plugin reads the same keys "
                      "for fixed-size micro-batches)"),
    PrivateSymbol(TENSORDICT_UTILS, "get_non_tensor_data", ("data", "key", "default"),
                  use="the mini-batch's batching settings (use_dynamic_bsz, force_group_size)"),
    PrivateSymbol(TENSORDICT_UTILS, "assign_non_tensor", ("tensor_dict",),
                  use="the sequence-parallel size (sp_size) set on the mini-batch before it is split"),
    PrivateSymbol("verl.workers.utils.padding", "no_padding_2_padding", ("tensor", "data"),
                  use="the engine's unpadded per-token log-probs and entropies as [B, T]"),
    PrivateSymbol("verl.workers.utils.losses", "ppo_loss", ("config", "model_output", "data", "dp_group"),
                  keys=("log_probs", "entropy", "old_log_probs", "advantages", "response_mask", "dp_size",
                        "batch_num_tokens", "global_batch_size", "loss_scale_factor"),
                  use="the actor's loss function: the engine worker binds it as functools.partial(ppo_loss, "
                      "config=...) (the hook reads the actor config there) and calls it with model_output=, data=, "
                      "dp_group= (the hook reads those); the plugin reads the same model-output and batch keys, and "
                      "the config.global_batch_info it fills (aggregation.py)"),
    PrivateSymbol("verl.trainer.ppo.ray_trainer:RayPPOTrainer", "_compute_old_log_prob", ("self", "batch"),
                  exact=True, keys=(DRIVER_ENTROPY_KEY, "old_log_probs"),
                  use="wrapped in the driver: with decision_policy=old the pass's entropies are kept for the actor "
                      "update beside old_log_probs"),
    PrivateSymbol("verl.trainer.main_ppo", "main.__wrapped__", ("config",),
                  use="verl's PPO entry point without its Hydra wrapper, called by `python -m stapo.engines.verl.main` "
                      "with the edited config"),
)


def _module(item: PrivateSymbol) -> str:
    return item.owner.partition(":")[0]


def internal_modules() -> set[str]:
    """The verl modules that own a symbol of `INTERNALS` (each checked when it is first imported)."""
    return {_module(item) for item in INTERNALS if item.owner != INSTANCE}


def internal_problems(module: str | None = None) -> list[str]:
    """The problems with the symbols of `INTERNALS` owned by verl's `module` (all modules when None), one line
    naming each symbol."""
    return symbol_problems(tuple(item for item in INTERNALS
                                 if item.owner != INSTANCE and module in (None, _module(item))))


def engine_problems(engine) -> list[str]:
    """The problems with the attributes of `INTERNALS` on `engine`, one of verl's training engines."""
    return symbol_problems(tuple(item for item in INTERNALS if item.owner == INSTANCE), instance=engine,
                           instance_name="engine")


def warn_on_changed_internals(module: str) -> list[str]:
    """Right after verl's `module` is imported: a `ChangedPrivateSymbolWarning` naming each missing or changed
    symbol it owns."""
    problems = internal_problems(module)
    warn_changed("stapo.engines.verl", problems, "stapo/engines/verl/internals.py and docs/verl.md")
    return problems
