"""The single-node / multi-GPU engine: TRL's GRPO trainer with the STAPO loss from `stapo.core`.

    STAPOConfig(GRPOConfig)    config.py       `method` (a `stapo.core` preset), the S2T thresholds, metrics
                                               and rollout-capture switches; the preset fills TRL's loss options
    STAPOTrainer(GRPOTrainer)  trainer.py      the loss step: log-probs/entropies -> token filter -> clipped
                                               loss -> metrics, all from `stapo.core`
    metrics.py                 per-step token sums, their reduction over processes, metrics.jsonl
    nonfinite.py               the non-finite step guard (checkpoints and resume: stapo.rundir)
    events.py                  the trainer's own callback events (each micro-batch's loss step, each step's
                               update decision)
    rollouts.py                token-level rollout captures for `stapo analyze` (a callback on those events)
    lm_head.py                 stapo's LM head in TRL's fused-head slot (`stapo_lm_head_in_trl`)
    vllm.py                    TRL's colocated vLLM rollouts on vLLM's CPU build
    internals.py               every private symbol of TRL / transformers / vLLM the engine relies on,
                               checked here at import (a warning naming each missing or changed one)
"""

from stapo.engines.trl.config import STAPOConfig
from stapo.engines.trl.internals import warn_on_changed_internals
from stapo.engines.trl.lm_head import stapo_lm_head_in_trl
from stapo.engines.trl.nonfinite import NonFiniteTrainingError
from stapo.engines.trl.trainer import STAPOTrainer

warn_on_changed_internals()

__all__ = ["STAPOConfig", "STAPOTrainer", "NonFiniteTrainingError", "stapo_lm_head_in_trl"]
