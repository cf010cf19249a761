"""STAPOTrainer at the edges of its loss, on a tiny random Qwen3 (CPU, float32):

* a step whose micro-batch has no valid token (every completion truncated and masked) trains with
  loss 0 for every method: the entropy quantile of an empty population used to be NaN and raise;
* the preset's dual clip (justrl / stapo: clip_ratio_c = 10) is applied: on a batch where it binds
  (A < 0, ratio > 10) the loss equals `stapo.core.policy_loss` with clip_ratio_c and a float64
  recomputation by hand, and differs from the loss without it.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from stapo.core import get_preset, policy_loss
from stapo.engines.trl import STAPOConfig, STAPOTrainer

# every test builds a real TRL trainer
pytestmark = pytest.mark.slow


def _reward(completions, completion_ids=None, **kwargs):
    return [float(ids[0] % 2 == 0) if len(ids) else 0.0 for ids in completion_ids]


@pytest.mark.parametrize("method", ["grpo", "stapo", "20-entropy"])
def test_a_step_without_valid_tokens_trains_with_loss_zero(tiny_qwen3_dir, tmp_path, method):
    args = STAPOConfig(
        output_dir=str(tmp_path), method=method, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=2,  # a random model over ~150k tokens never ends within 2: every completion truncated
        mask_truncated_completions=True, max_steps=1, learning_rate=1e-3, use_cpu=True, bf16=False,
        report_to=[], logging_steps=1, save_strategy="no", seed=3, metrics_jsonl=False,
    )
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    ds = Dataset.from_dict({"prompt": ["What is 2+3?", "Name a prime."] * 4})
    trainer = STAPOTrainer(model=str(tiny_qwen3_dir), reward_funcs=_reward, args=args, train_dataset=ds,
                           processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    assert logged["stapo/completion_tokens"] == 0.0  # the premise: nothing valid in the step
    assert logged["loss"] == 0.0 and logged["grad_norm"] == 0.0
    assert logged["stapo/s2t_masked_count"] == 0.0 and logged["stapo/nonfinite_steps"] == 0.0
    assert math.isfinite(logged["stapo/entropy_threshold"])
    for name, p in trainer.model.named_parameters():  # zero gradient: Adam leaves the weights as they were
        assert torch.equal(p.detach(), before[name]), name


def _dual_clip_trainer(model_dir, tmp_path, method):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = STAPOConfig(output_dir=str(tmp_path), method=method, per_device_train_batch_size=4, num_generations=2,
                       max_completion_length=5, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                       fused_lm_head=False)
    trainer = STAPOTrainer(model=model, reward_funcs=_reward, args=args,
                           processing_class=AutoTokenizer.from_pretrained(model_dir),
                           train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def test_dual_clip_of_the_preset_is_applied_where_it_binds(tiny_qwen3_dir, tmp_path):
    trainer = _dual_clip_trainer(tiny_qwen3_dir, tmp_path, "justrl")
    assert trainer.args.clip_ratio_c == get_preset("justrl").clip_ratio_c == 10.0
    g = torch.Generator().manual_seed(5)
    vocab, rows, t = trainer.model.config.vocab_size, 4, 5
    completion_mask = (torch.arange(t)[None, :] < torch.tensor([5, 3, 4, 2])[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(0, vocab, (rows, 3), generator=g),
        "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": torch.randint(0, vocab, (rows, t), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([-1.0, 0.7, -0.4, 1.2]),
        "num_items_in_batch": completion_mask.sum(),
    }
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, t)
    # ratio = exp(3) ≈ 20 > c = 10 on every token: the dual clip binds for the A < 0 rows
    batch["old_per_token_logps"] = logps - 3.0
    trainer._buffered_inputs, trainer._step = [batch], 0  # one optimizer step, as TRL buffers it
    loss = trainer._compute_loss(trainer.model, batch).detach()

    valid = completion_mask.bool()
    adv = batch["advantages"][:, None].expand(rows, t)
    kw = dict(clip_low=0.2, clip_high=0.28, agg="token-mean", num_tokens=valid.sum())
    core, _ = policy_loss(logps, batch["old_per_token_logps"], adv, valid, clip_ratio_c=10.0, **kw)
    undual, _ = policy_loss(logps, batch["old_per_token_logps"], adv, valid, **kw)
    # by hand, float64: per token max(-A r, -A clip(r, 0.8, 1.28)), capped at -A·c where A < 0
    r = torch.full((rows, t), math.exp(3.0), dtype=torch.float64)
    a = adv.double()
    term = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))
    term = torch.where(a < 0, torch.minimum(term, -a * 10.0), term)
    by_hand = term[valid].sum() / valid.sum()
    assert torch.allclose(loss, core, atol=1e-6, rtol=0), (float(loss), float(core))
    assert abs(float(loss) - float(by_hand)) < 1e-5 * max(1.0, abs(float(by_hand)))
    assert float(undual) - float(loss) > 1.0  # without the dual clip the A < 0 rows would weigh ~20|A|


@pytest.mark.parametrize("tau_p, warns", [(0.0, True), (1.0, False)])
def test_inert_s2t_guard_through_the_trainer(tiny_qwen3_dir, tmp_path, caplog, tau_p, warns):
    """tau_p = 0 silences nothing: after inert_warning_steps steps one warning line with the counts and a
    suggested tau_h. tau_p = 1 with a huge tau_h silences every A > 0 token: no warning."""
    args = STAPOConfig(
        output_dir=str(tmp_path), method="stapo", tau_p=tau_p, tau_h=100.0, inert_warning_steps=2,
        per_device_train_batch_size=4, num_generations=2, max_completion_length=4, max_steps=3,
        learning_rate=1e-3, use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=3,
        metrics_jsonl=False,
    )
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    ds = Dataset.from_dict({"prompt": ["What is 2+3?", "Name a prime."] * 6})
    trainer = STAPOTrainer(model=str(tiny_qwen3_dir), reward_funcs=_reward, args=args, train_dataset=ds,
                           processing_class=tok)
    with caplog.at_level("WARNING", logger="stapo.engines.trl.trainer"):
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("stapo/s2t_candidates" in h and "stapo/s2t_low_prob" in h for h in logged)
    inert = [r.getMessage() for r in caplog.records if "silenced no token" in r.getMessage()]
    if warns:
        assert all(h["stapo/s2t_masked_count"] == 0 for h in logged)
        assert len(inert) == 1, inert  # once, not at every later step
        assert "for 2 optimizer steps in a row" in inert[0] and "candidates (A > 0)" in inert[0]
    else:
        assert sum(h["stapo/s2t_masked_count"] for h in logged) > 0 and inert == []
