"""The single-node / multi-GPU engine: TRL's GRPO trainer with the STAPO loss from `stapo.core`.

    STAPOConfig(GRPOConfig)    config.py       `method` (a `stapo.core` preset), the S2T thresholds, metrics
                                               and rollout-capture switches; the preset fills TRL's loss options
    STAPOTrainer(GRPOTrainer)  trainer.py      the loss step: log-probs/entropies -> token filter -> clipped
                                               loss -> metrics, all from `stapo.core`
    metrics.py                 per-step token sums, their reduction over processes, metrics.jsonl
    nonfinite.py               the non-finite step guard (checkpoints and resume: stapo.rundir)
    rollouts.py                token-level rollout captures for `stapo analyze`
    lm_head.py                 stapo's LM head in TRL's fused-head slot (`stapo_lm_head_in_trl`)
"""

from stapo.engines.trl.nonfinite import NonFiniteTrainingError
from stapo.engines.trl.config import STAPOConfig
from stapo.engines.trl.lm_head import stapo_lm_head_in_trl
from stapo.engines.trl.trainer import STAPOTrainer

__all__ = ["STAPOConfig", "STAPOTrainer", "NonFiniteTrainingError", "stapo_lm_head_in_trl"]
