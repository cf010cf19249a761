"""A non-finite forward (NaN/inf log-probs or entropies at a valid position) is handled like a non-finite
gradient: the optimizer update of that step is skipped and counted, the step and the number of affected
positions are logged, a rollout capture of that step is marked as from a skipped step, and the run goes on.
"""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from stapo.data.rollouts import read_rollouts
from stapo.engines.trl import STAPOConfig, STAPOTrainer

BAD_STEP = 2


def _reward(completions, **kwargs):
    return [float(len(c) % 2) for c in completions]


class WeightsPerStep(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.before, self.after = trainer, {}, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.before[state.global_step + 1] = [p.detach().clone() for p in self.trainer.model.parameters()]

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = [p.detach().clone() for p in self.trainer.model.parameters()]


@pytest.mark.slow
def test_a_nonfinite_forward_skips_the_step_and_the_run_goes_on(tiny_qwen3_dir, tmp_path, monkeypatch, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
    args = STAPOConfig(output_dir=str(tmp_path), method="stapo", per_device_train_batch_size=2, num_generations=2,
                       gradient_accumulation_steps=2,
                       max_steps=3, max_completion_length=6, learning_rate=1e-2, use_cpu=True, bf16=False,
                       report_to=[], save_strategy="no", logging_steps=1, capture_rollouts_every=1,
                       capture_max_samples=2, seed=0)
    trainer = STAPOTrainer(model=model, reward_funcs=_reward, args=args, processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 =", "3 + 3 ="]}))
    weights = WeightsPerStep(trainer)
    trainer.add_callback(weights)
    real = STAPOTrainer._policy_forward

    def forward(self, model, inputs, compute_aux_loss=False):
        logps, entropies, aux = real(self, model, inputs, compute_aux_loss)
        # the first micro-batch of the bad step (the second one trains and captures its rollouts)
        if torch.is_grad_enabled() and self.state.global_step + 1 == BAD_STEP and self._step % 2 == 0:
            valid = inputs["completion_mask"].bool()
            logps = torch.where(valid & (valid.cumsum(-1) == 1) & (torch.arange(len(valid))[:, None] == 0),
                                torch.full_like(logps, float("nan")), logps)  # one valid position
        return logps, entropies, aux

    monkeypatch.setattr(STAPOTrainer, "_policy_forward", forward)
    with caplog.at_level(logging.WARNING, logger="stapo.engines.trl.trainer"):
        trainer.train()

    assert trainer.state.global_step == 3  # the run went on
    assert trainer._nonfinite.total == 1
    assert any(f"step {BAD_STEP} skipped: non-finite forward at 1 valid position" in r.getMessage()
               for r in caplog.records)
    same = [torch.equal(a, b) for a, b in zip(weights.before[BAD_STEP], weights.after[BAD_STEP])]
    assert all(same)  # no update at the bad step
    assert not all(torch.equal(a, b) for a, b in zip(weights.before[3], weights.after[3]))  # the next one trains
    captured = read_rollouts(tmp_path).metadata
    assert {step: meta["update_skipped"] for step, meta in captured.items()} == {1: False, 2: True, 3: False}
