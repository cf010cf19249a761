"""STAPO inside verl: the only part of stapo that imports verl.

Importing this module (verl does it in every process through the `verl.plugins` entry point, or
through `actor_rollout_ref.model.external_lib=stapo.engines.verl`)

  - registers the policy losses `stapo` and `20-entropy` with verl's registry
    (`verl.trainer.ppo.core_algos.register_policy_loss`), computed with `stapo.core`'s token filters;
  - wraps verl's per-mini-batch engine call (`BaseEngine.train_batch`, `install_engine_hook`): each
    micro-batch's loss call gets its entropies (verl's policy-loss signature has none), and with
    `stapo.tau_h_scope=mini_batch` over several micro-batches a forward-only pass first takes S2T's
    tau_h over the whole mini-batch. Other loss modes run as before;
  - checks, as each verl module it relies on is imported, the private symbols of verl it uses
    (`internals.py`): a warning naming each one that is missing or changed.

    losses.py           the registered losses
    entropy_channel.py  each micro-batch's entropies for losses whose signature has none
    aggregation.py      verl's loss aggregation in stapo.core's terms
    engine_hook.py      the import hook (verl's engine call and driver pass wrapped, internals checked)
    internals.py        every verl symbol the plugin relies on beyond verl's extension points
    config.py, main.py, recipe.py, data.py   the stapo config block, the launcher, recipes, data

Launch with `python -m stapo.engines.verl.main <verl overrides>`: verl's `main_ppo` plus entropy switched on
and the `stapo` config block selected when `loss_mode` is `stapo` / `20-entropy`. See docs/verl.md.
"""

from __future__ import annotations

import warnings

import verl

from stapo.engines.verl.aggregation import core_loss_kwargs
from stapo.engines.verl.config import (
    LOSS_MODE_FILTERS,
    LOSS_MODES,
    POLICY_LOSS_TARGET,
    StapoPolicyLossConfig,
    VerlStapoSettings,
    actor_clip_settings,
    deprecated_alias,
    loss_mode_filter,
    stapo_settings,
)
from stapo.engines.verl.engine_hook import install_engine_hook, mini_batch_s2t
from stapo.engines.verl.entropy_channel import MiniBatchS2T, entropy_context, with_entropy
from stapo.engines.verl.losses import compute_policy_loss_high_entropy, compute_policy_loss_stapo

SUPPORTED_VERL_VERSIONS = ("0.9.1",)

if getattr(verl, "__version__", None) not in SUPPORTED_VERL_VERSIONS:
    warnings.warn(
        f"stapo.engines.verl is tested with verl {', '.join(SUPPORTED_VERL_VERSIONS)}; found verl "
        f"{getattr(verl, '__version__', 'unknown')}. The engine hook wraps verl's "
        "`BaseEngine.train_batch`; check docs/verl.md.",
        stacklevel=2,
    )

install_engine_hook()

__all__ = [
    "LOSS_MODES",
    "LOSS_MODE_FILTERS",
    "MiniBatchS2T",
    "POLICY_LOSS_TARGET",
    "SUPPORTED_VERL_VERSIONS",
    "StapoPolicyLossConfig",
    "VerlStapoSettings",
    "actor_clip_settings",
    "compute_policy_loss_high_entropy",
    "compute_policy_loss_stapo",
    "core_loss_kwargs",
    "entropy_context",
    "install_engine_hook",
    "loss_mode_filter",
    "mini_batch_s2t",
    "stapo_settings",
    "with_entropy",
]


def __getattr__(name: str):
    return deprecated_alias(__name__, name)
