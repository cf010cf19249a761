"""STAPO inside verl: the only part of stapo that imports verl.

Importing this module (verl does it in every process through the `verl.plugins` entry point, or
through `actor_rollout_ref.model.external_lib=stapo.engines.verl`)

  - registers the policy losses `stapo` and `20-entropy` with verl's registry
    (`verl.trainer.ppo.core_algos.register_policy_loss`), computed by `stapo.core`;
  - routes verl's actor loss through `stapo_actor_loss`, which hands the micro-batch's entropies to
    those two losses (verl's loss signature has none) and changes nothing for other loss modes.

Launch with `python -m stapo.engines.verl.main <verl overrides>`: verl's `main_ppo` plus entropy switched on
and the `stapo` config block selected when `loss_mode` is `stapo` / `20-entropy`. See docs/verl.md.
"""

from __future__ import annotations

import warnings

import verl

from stapo.engines.verl.config import LOSS_MODES, POLICY_LOSS_TARGET, StapoConfig, StapoPolicyLossConfig, stapo_settings
from stapo.engines.verl.losses import (
    compute_policy_loss_high_entropy,
    compute_policy_loss_stapo,
    core_loss_kwargs,
    entropy_context,
    install_actor_loss_hook,
    stapo_actor_loss,
)

SUPPORTED_VERL_VERSIONS = ("0.9.1",)

if getattr(verl, "__version__", None) not in SUPPORTED_VERL_VERSIONS:
    warnings.warn(
        f"stapo.engines.verl is tested with verl {', '.join(SUPPORTED_VERL_VERSIONS)}; found verl "
        f"{getattr(verl, '__version__', 'unknown')}. The actor-loss hook relies on verl's engine "
        "workers' `ppo_loss`; check docs/verl.md.",
        stacklevel=2,
    )

install_actor_loss_hook()

__all__ = [
    "LOSS_MODES",
    "POLICY_LOSS_TARGET",
    "SUPPORTED_VERL_VERSIONS",
    "StapoConfig",
    "StapoPolicyLossConfig",
    "compute_policy_loss_high_entropy",
    "compute_policy_loss_stapo",
    "core_loss_kwargs",
    "entropy_context",
    "install_actor_loss_hook",
    "stapo_actor_loss",
    "stapo_settings",
]
