"""The import hook: verl's engine call and driver pass wrapped when verl imports them, and each verl module's
private symbols checked.

`install_engine_hook` (run when stapo.engines.verl is imported) puts a finder on `sys.meta_path` that,
right after one of the watched verl modules executes (its first import; a module already imported is
handled at once):

  - checks the symbols of `internals.py` that module owns: a warning naming each missing or changed one;
  - `verl.workers.engine.base`: wraps `BaseEngine.train_batch(data, loss_function)`, verl's per-mini-batch
    call (zero grad, the micro-batches' forward/backward, one optimizer step; every verl engine inherits
    it). The loss function is wrapped with `entropy_channel.with_entropy`, so each micro-batch's loss call
    gets its entropies; with `stapo.tau_h_scope=mini_batch` (the default) and a mini-batch that splits into
    several micro-batches (or `decision_policy=old`), `mini_batch_s2t` first takes S2T's tau_h over all its
    micro-batches and data-parallel ranks (`stapo.core.s2t_over_step`) and counts the tokens it silences;
    every micro-batch's loss then applies that threshold to its own values. The decision is the one on the
    whole mini-batch at once, however it is split. One micro-batch per rank needs no pre-pass (its
    quantile, gathered over the ranks, is the mini-batch's). `micro_batch` scope: each micro-batch's own
    quantile, no pre-pass. verl's own loss modes run as before;
  - `verl.trainer.ppo.ray_trainer`: wraps the driver's `RayPPOTrainer._compute_old_log_prob`
    (`keep_old_entropies`: pi_old's entropies kept for `decision_policy=old`).

Done when each module is imported rather than by importing it here: importing verl's engines from the
plugin would resolve verl's accelerator platform before other plugins could register theirs.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from collections.abc import Callable
from typing import Any

import torch

from stapo.core import S2TSettings, TokenFilterSpec, nonfinite_positions, s2t_over_step
from stapo.engines.verl.config import VerlStapoSettings, loss_mode_filter, stapo_settings
from stapo.engines.verl.entropy_channel import OLD_ENTROPY_KEY, MiniBatchS2T, padded, with_entropy
from stapo.engines.verl.internals import DRIVER_ENTROPY_KEY, internal_modules, warn_on_changed_internals

__all__ = ["install_engine_hook", "keep_old_entropies", "mini_batch_s2t"]


def _actor_config(loss_function):
    """The actor config bound to a verl loss function (`partial(ppo_loss, config=...)`, as the engine
    worker builds it), or None."""
    seen = 0
    fn = loss_function
    while fn is not None and seen < 4:
        if isinstance(fn, functools.partial):
            config = fn.keywords.get("config", None)
            if config is not None:
                return config
            fn = fn.func
        else:
            fn = getattr(fn, "__wrapped__", None)
        seen += 1
    return None


def _micro_batch_count(engine, data) -> int:
    """How many micro-batches this rank's mini-batch splits into: verl's own split
    (`prepare_micro_batches`, as the FSDP engine's `forward_backward_batch` calls it)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches

    if not tu.get_non_tensor_data(data=data, key="use_dynamic_bsz", default=True):
        size = data["micro_batch_size_per_gpu"]
        group = tu.get_non_tensor_data(data=data, key="force_group_size", default=1)
        return max(1, len(data) // (size * group))
    sp = getattr(engine, "ulysses_sequence_parallel_size", None)
    if sp is not None:
        tu.assign_non_tensor(data, sp_size=sp)
    micro_batches, _ = prepare_micro_batches(data=data, dp_group=engine.get_data_parallel_group(),
                                             same_micro_num_in_dp=True)
    return len(micro_batches)


def mini_batch_s2t(engine, data, s2t: S2TSettings) -> tuple[torch.Tensor | None, float | None]:
    """S2T's (tau_h, silenced tokens) over a whole PPO mini-batch, summed over the data-parallel ranks
    (`stapo.core.s2t_over_step`). `decision_policy=current`: a forward-only pass of `engine` over `data`
    (verl's `infer_batch`, the same micro-batches as the training pass) gives the current policy's values;
    `old`: pi_old's log-probs and entropies are in `data` already (no forward)."""
    if s2t.decision_policy == "old":
        if OLD_ENTROPY_KEY not in data.keys():
            raise ValueError(f"stapo.decision_policy=old needs pi_old's entropies in the actor batch "
                             f"({OLD_ENTROPY_KEY}); launch with `python -m stapo.engines.verl.main`, which keeps them")
        fields = data.select("old_log_probs", OLD_ENTROPY_KEY, "advantages", "response_mask").to_padded_tensor()
        parts = [(fields["old_log_probs"], fields[OLD_ENTROPY_KEY], fields["advantages"],
                  fields["response_mask"].bool())]
    else:
        parts = []  # each micro-batch's (log-probs, entropies, advantages, valid), detached

        def collect(model_output=None, data=None, dp_group=None, **_):
            if model_output is None:  # verl's logits-processor call (top-k distillation): nothing to add
                return {}
            if model_output.get("entropy", None) is None:
                raise ValueError("stapo.tau_h_scope=mini_batch: the pre-pass got no entropies; set actor_rollout_ref"
                                 ".actor.calculate_entropy=True (python -m stapo.engines.verl.main does)")
            lp = padded(model_output["log_probs"], data)
            ent = padded(model_output["entropy"], data)
            fields = data.select("response_mask", "advantages").to_padded_tensor()
            parts.append((lp.detach(), ent.detach(), fields["advantages"], fields["response_mask"].bool()))
            return torch.zeros((), device=lp.device), {}

        engine.infer_batch(data, loss_function=collect)
    if any(nonfinite_positions(p[3], p[0], p[1]) for p in parts):  # the losses skip the step themselves
        return None, None
    step = s2t_over_step(parts, s2t, group=engine.get_data_parallel_group())
    return step.step_tau_h, float(step.num_silenced.item())


def _field(obj, key):
    getter = getattr(obj, "get", None)
    return getter(key, None) if callable(getter) else getattr(obj, key, None)


def _stapo_settings_for(config) -> tuple[TokenFilterSpec | None, VerlStapoSettings | None]:
    """The token filter and settings of an actor config whose loss mode is the plugin's, else (None, None)."""
    policy_loss = None if config is None else _field(config, "policy_loss")
    spec = None if policy_loss is None else loss_mode_filter(_field(policy_loss, "loss_mode") or "vanilla")
    return (spec, stapo_settings(config)) if spec is not None else (None, None)


_VERL_TRAIN_BATCH: Callable[..., Any] | None = None  # verl's own, kept by _patch_base_engine


def _train_batch(self, data, loss_function):
    """verl's `BaseEngine.train_batch`, with the micro-batches' entropies handed to the stapo losses and,
    for S2T with `tau_h_scope=mini_batch` over several micro-batches, the mini-batch's tau_h taken first."""
    verl_train_batch = _VERL_TRAIN_BATCH
    assert verl_train_batch is not None  # the hook is installed only after keeping verl's method
    config = _actor_config(loss_function)
    spec, settings = _stapo_settings_for(config)
    if spec is None and config is not None:  # one of verl's own loss modes: untouched
        return verl_train_batch(self, data, loss_function=loss_function)
    mini_batch = MiniBatchS2T()
    if spec is not None:
        assert settings is not None  # given with the spec
        mini_batch.micro_batches = _micro_batch_count(self, data)
        s2t = settings.s2t
        # pi_old's values are in the batch already: the whole mini-batch's decision costs no forward
        whole = s2t.decision_policy == "old" or mini_batch.micro_batches > 1
        if spec.applies_s2t and s2t.tau_h_scope == "mini_batch" and whole:
            mini_batch.threshold, mini_batch.masked = mini_batch_s2t(self, data, s2t)
            mini_batch.nonfinite = mini_batch.masked is None
    return verl_train_batch(self, data, loss_function=with_entropy(loss_function, mini_batch))


_ENGINE_BASE = "verl.workers.engine.base"
_RAY_TRAINER = "verl.trainer.ppo.ray_trainer"


def _patch_base_engine(module) -> None:
    global _VERL_TRAIN_BATCH
    engine = module.BaseEngine
    current = engine.train_batch
    if getattr(current, "_stapo_hook", False):
        return
    _VERL_TRAIN_BATCH = current

    @functools.wraps(current)  # verl's name and signature stay visible (what internals.py checks)
    def train_batch(self, data, loss_function):
        return _train_batch(self, data, loss_function)

    train_batch._stapo_hook = True  # type: ignore[attr-defined]
    engine.train_batch = train_batch


def keep_old_entropies(trainer_config, old_log_prob) -> None:
    """With `stapo.decision_policy=old`, copy the entropies of verl's old-log-prob pass (`entropys`, which the
    driver logs and then drops) to `OLD_ENTROPY_KEY`, so they reach the actor update beside `old_log_probs`."""
    actor = trainer_config.actor_rollout_ref.actor
    spec, settings = _stapo_settings_for(actor)
    if spec is not None and settings is not None and spec.applies_s2t and settings.s2t.decision_policy == "old":
        old_log_prob.batch[OLD_ENTROPY_KEY] = old_log_prob.batch[DRIVER_ENTROPY_KEY].clone()


def _patch_ray_trainer(module) -> None:
    trainer = module.RayPPOTrainer
    current = trainer._compute_old_log_prob
    if getattr(current, "_stapo_hook", False):
        return

    @functools.wraps(current)
    def compute_old_log_prob(self, batch, *args, **kwargs):
        old_log_prob, *rest = current(self, batch, *args, **kwargs)
        keep_old_entropies(self.config, old_log_prob)
        return (old_log_prob, *rest)

    compute_old_log_prob._stapo_hook = True  # type: ignore[attr-defined]
    trainer._compute_old_log_prob = compute_old_log_prob


_PATCHES = {_ENGINE_BASE: _patch_base_engine, _RAY_TRAINER: _patch_ray_trainer}
_PATCHED_CLASS = {_ENGINE_BASE: "BaseEngine", _RAY_TRAINER: "RayPPOTrainer"}


def _watched() -> set[str]:
    """The verl modules the hook acts on: those it patches and those owning a symbol of `internals.py`."""
    return set(_PATCHES) | internal_modules()


def _after_import(module) -> None:
    """Right after a watched verl module executes: the check of the symbols stapo relies on in it (a warning
    naming each missing or changed one), then its patch."""
    warn_on_changed_internals(module.__name__)
    patch = _PATCHES.get(module.__name__)
    if patch is not None:
        patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs `_after_import` right after a watched verl module executes (its first import)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _watched():
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, with `_after_import` once the module has executed; anything else asked of it
    (its source, resources) is the original loader's answer."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _after_import(module)


def install_engine_hook() -> None:
    """Watch verl's modules (see the module docstring): `_after_import` now for those already imported, and
    the finder on `sys.meta_path` for the others; idempotent."""
    for name in sorted(_watched()):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, _PATCHED_CLASS.get(name, "__name__")):
            _after_import(module)
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
