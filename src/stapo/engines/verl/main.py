"""`python -m stapo.engines.verl.main <verl Hydra overrides>`: verl's PPO trainer with STAPO's settings.

The same command line as `python -m verl.trainer.main_ppo` (same config, same overrides). When
`actor_rollout_ref.actor.policy_loss.loss_mode` is `stapo` or `20-entropy`, `apply_stapo_defaults`
  - switches `actor.calculate_entropy` on (the losses need the current policy's entropies),
  - selects `StapoPolicyLossConfig` as the policy-loss config (`policy_loss.stapo.*` keys) and
    validates that block (defaults from `stapo.core.S2TSettings` and the presets),
  - asks the workers to import `stapo.engines.verl` (`model.external_lib`) if no plugin entry point does,
and changes nothing for other loss modes.
"""

from __future__ import annotations

from typing import Any, cast

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from stapo.engines.verl.config import LOSS_MODES, POLICY_LOSS_TARGET, STAPO_KEYS, VerlStapoSettings


def apply_stapo_defaults(cfg: DictConfig) -> DictConfig:
    """Edit a composed verl PPO config in place for the stapo loss modes (see the module doc)."""
    actor = cfg.actor_rollout_ref.actor
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla")
    block = actor.policy_loss.get("stapo", None)
    if loss_mode not in LOSS_MODES:
        if block is not None:
            raise ValueError(
                f"actor_rollout_ref.actor.policy_loss.stapo is set but loss_mode={loss_mode!r}; "
                f"it only applies to {', '.join(LOSS_MODES)}"
            )
        return cfg
    # a mapping block (the config's own) converts to a dict
    items: dict[str, Any] = {} if block is None else cast(dict[str, Any], OmegaConf.to_container(block, resolve=True))
    items.pop("_target_", None)
    try:
        settings = VerlStapoSettings(**items)
    except TypeError as exc:
        raise ValueError(f"actor_rollout_ref.actor.policy_loss.stapo: {exc}") from None
    with open_dict(cfg):
        actor.calculate_entropy = True
        actor.policy_loss._target_ = POLICY_LOSS_TARGET
        actor.policy_loss.stapo = {name: getattr(settings, name) for name in STAPO_KEYS}
        model = cfg.actor_rollout_ref.model
        libs = model.get("external_lib", None)
        if libs is None:
            model.external_lib = "stapo.engines.verl"
        elif "stapo.engines.verl" not in (list(libs) if not isinstance(libs, str) else [libs]):
            model.external_lib = (list(libs) if not isinstance(libs, str) else [libs]) + ["stapo.engines.verl"]
    return cfg


@hydra.main(config_path="pkg://verl.trainer.config", config_name="ppo_trainer", version_base=None)
def main(cfg: DictConfig) -> None:
    from verl.trainer import main_ppo

    import stapo.engines.verl  # noqa: F401 - registers the losses in the driver too

    apply_stapo_defaults(cfg)
    main_ppo.main.__wrapped__(cfg)


if __name__ == "__main__":
    main()
