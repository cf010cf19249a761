"""STAPOTrainer at the paper's layout: several optimizer steps per generation (steps_per_generation =
4 x GA, so steps 2-4 are off-policy) and several micro-batches per step, trained for real through TRL's
loop on a tiny Qwen3 whose LM head is sharpened (token probabilities and entropies spread widely).

Every optimizer step's gradient (as the optimizer receives it) is compared with an independent float64
reference (`token_mean_reference`): the same weights, log-probs and entropies recomputed with a float64
forward, and the step's token-mean over its *own* kept tokens -- the paper's (verl's) rule. TRL's own
normaliser divides every step by the generation batch's average tokens per step instead; the steps
here differ in token count, so that rule fails this test.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from datasets import Dataset
from token_mean_reference import Method, spurious_tokens, step_loss
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from stapo.core import filtered_policy_loss
from stapo.engines.trl import STAPOConfig, STAPOTrainer
from stapo.engines.trl.trainer import OLD_ENTROPY_KEY

# every test builds a real TRL trainer
pytestmark = pytest.mark.slow

GA, STEPS_PER_GENERATION, ROWS, GENERATIONS = 2, 8, 4, 4
TEMPERATURE = 1.0
METHODS = {  # the presets' clip ranges, written out: the reference does not read stapo's presets
    "grpo": Method(clip_low=0.2, clip_high=0.2),
    "stapo": Method(clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0, tau_p=0.002, tau_h_quantile=0.75),
}


@pytest.fixture(scope="module")
def sharp_qwen3_dir(tmp_path_factory, qwen3_tokenizer_dir):
    """A 2-layer random Qwen3 with an untied LM head scaled x8 (peaked next-token distributions: sampled tokens
    range from confident to very unlikely, entropies spread; a random head is ~uniform) and its end-of-text
    row aimed at the typical last hidden state, so completions end after a few tokens (steps then differ
    in size)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        ids = torch.randint(0, 5000, (16, 12), generator=torch.Generator().manual_seed(0))
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(-1, config.hidden_size)
        direction = hidden.mean(0) / hidden.mean(0).norm()
        for scale in torch.logspace(0, 3, 60).tolist():  # the smallest that ends ~20% of positions
            model.lm_head.weight[tokenizer.eos_token_id] = scale * direction
            if model.lm_head(hidden).softmax(-1)[:, tokenizer.eos_token_id].mean() > 0.2:
                break
    out = tmp_path_factory.mktemp("sharp_qwen3")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _reward(completions, **kwargs):
    """Varied 0/1 rewards, so groups have positive and negative advantages."""
    return [float(len(c) % 3 == 0) for c in completions]


class StepRecorder(TrainerCallback):
    """At each optimizer step (gradients final, weights not yet updated): the weights, the gradients and
    the step's micro-batches as TRL buffered them."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        start = (t._step - GA) % args.steps_per_generation
        self.steps.append(dict(
            weights={n: p.detach().clone() for n, p in t.model.named_parameters()},
            grads={n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None},
            parts=[dict(part) for part in t._buffered_inputs[start : start + GA]],
        ))


def _train(model_dir, tmp_path, method, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = STAPOConfig(
        output_dir=str(tmp_path), method=method, per_device_train_batch_size=ROWS, num_generations=GENERATIONS,
        gradient_accumulation_steps=GA, steps_per_generation=STEPS_PER_GENERATION, max_steps=4,
        max_completion_length=8, temperature=TEMPERATURE, learning_rate=5e-4, max_grad_norm=1e9, use_cpu=True,
        bf16=False, report_to=[], save_strategy="no", logging_steps=1, seed=0, metrics_jsonl=False,
        **overrides,
    )
    prompts = [f"Q{i}: {i} + {i}?" for i in range(STEPS_PER_GENERATION * ROWS // GENERATIONS)]
    trainer = STAPOTrainer(model=model, reward_funcs=_reward, args=args, processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"prompt": prompts}))
    recorder = StepRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    return recorder.steps


def _float64_values(model, part):
    """Log-probs (differentiable) and entropies of the part's completion tokens, float64, as TRL computes
    them: logits of positions -T-1..-2 of prompt + completion, divided by the temperature."""
    ids = torch.cat([part["prompt_ids"], part["completion_ids"]], dim=1)
    attn = torch.cat([part["prompt_mask"], part["completion_mask"]], dim=1)
    t = part["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1].double() / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, part["completion_ids"][..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent.detach()


def _reference(model_dir, step, method: Method, old_policy: bool = False):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    model.load_state_dict({n: w.double() for n, w in step["weights"].items()}, strict=False)
    lps, ents, olds, advs, valids = [], [], [], [], []
    for part in step["parts"]:
        lp, ent = _float64_values(model, part)
        lps.append(lp), ents.append(ent), olds.append(part["old_per_token_logps"].double())
        advs.append(part["advantages"].double()[:, None].expand_as(lp))
        valids.append(part["completion_mask"].bool())
    if old_policy:  # the decision on pi_old's values, as TRL's old-log-prob pass computed them
        decided = [(part["old_per_token_logps"].double(), part[OLD_ENTROPY_KEY].double()) for part in step["parts"]]
    else:
        decided = [(lp.detach(), e) for lp, e in zip(lps, ents)]
    spurious = spurious_tokens([(lp, e, a, v) for (lp, e), a, v in zip(decided, advs, valids)], method)
    loss = step_loss(lps, olds, advs, valids, spurious, method)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, sum(int(s.sum()) for s in spurious), [int(v.sum()) for v in valids]


@pytest.mark.parametrize("method, decision_policy", [("grpo", "current"), ("stapo", "current"), ("stapo", "old")])
def test_each_optimizer_step_is_its_own_token_mean(sharp_qwen3_dir, tmp_path, method, decision_policy):
    """decision_policy=old: S2T decides on pi_old's log-probs and entropies, which the old-log-prob pass
    while generating computed (the entropies are kept with the batch); no pre-pass forward runs."""
    steps = _train(sharp_qwen3_dir, tmp_path, method, decision_policy=decision_policy)
    assert len(steps) == 4
    assert (OLD_ENTROPY_KEY in steps[0]["parts"][0]) == (method == "stapo" and decision_policy == "old")
    step_tokens, silenced = [], 0
    for k, step in enumerate(steps):
        ref, n_silenced, tokens = _reference(sharp_qwen3_dir, step, METHODS[method], decision_policy == "old")
        step_tokens.append(sum(tokens))
        silenced += n_silenced
        assert ref.keys() == step["grads"].keys()
        got = torch.cat([step["grads"][name].double().reshape(-1) for name in ref])
        want = torch.cat([g.reshape(-1) for g in ref.values()])
        # float32 against float64, relative to the whole gradient (TRL's averaged denominator: off by ~8% here)
        error = float((got - want).norm() / want.norm())
        print(f"step {k + 1}: {sum(tokens)} tokens, {n_silenced} silenced, relative gradient error {error:.2e}")
        assert error < 1e-5, (k + 1, error)
    assert len(set(step_tokens)) > 1, step_tokens  # steps of different sizes: the averaged rule would differ
    if method == "stapo":
        assert silenced > 0  # S2T acted, so its denominator was exercised


def test_old_decision_policy_decides_on_pi_olds_values(sharp_qwen3_dir, tmp_path, monkeypatch):
    """decision_policy=old reads pi_old's p and H from the batch (no pre-pass forward), current pi_theta's.
    Old log-probs are planted so that p crosses tau_p between the two policies on known tokens: each setting
    silences exactly its own set (tau_h far above every entropy: p alone decides)."""
    import stapo.engines.trl.trainer as trainer_module

    tokenizer = AutoTokenizer.from_pretrained(sharp_qwen3_dir)
    rows, t, tau_p = 4, 6, 1e-4
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 3, 5, 2])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    batch = {"prompt_ids": torch.randint(0, 5000, (rows, 3), generator=g), "prompt_mask": torch.ones(rows, 3).long(),
             "completion_ids": torch.randint(0, 5000, (rows, t), generator=g), "completion_mask": mask,
             "advantages": torch.tensor([1.0, 0.5, -1.0, 0.8]), "num_items_in_batch": mask.sum()}
    found = {}
    for policy in ("current", "old"):
        model = AutoModelForCausalLM.from_pretrained(sharp_qwen3_dir, dtype=torch.float32)
        args = STAPOConfig(output_dir=str(tmp_path / policy), method="stapo", per_device_train_batch_size=rows,
                           num_generations=2, gradient_accumulation_steps=1, steps_per_generation=2, use_cpu=True,
                           bf16=False, report_to=[], save_strategy="no", tau_p=tau_p, tau_h=1e3,
                           decision_policy=policy, max_completion_length=t)
        trainer = STAPOTrainer(model=model, reward_funcs=_reward, args=args, processing_class=tokenizer,
                               train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop; this test calls the loss
        with torch.no_grad():
            lp, ent, _ = trainer._policy_forward(trainer.model, batch)
        flip = torch.rand(lp.shape, generator=torch.Generator().manual_seed(1)) < 0.5
        old = torch.where(flip, torch.where(lp < torch.log(torch.tensor(tau_p)), -0.5, -12.0), lp)
        b = dict(batch, old_per_token_logps=old, **{OLD_ENTROPY_KEY: ent})
        outs, forwards = [], []

        def recorded_loss(*a, outs=outs, **k):
            outs.append(filtered_policy_loss(*a, **k))
            return outs[-1]

        def counted_forward(*a, forwards=forwards, trainer=trainer, **k):
            forwards.append(1)
            return type(trainer)._policy_forward(trainer, *a, **k)

        monkeypatch.setattr(trainer_module, "filtered_policy_loss", recorded_loss)
        monkeypatch.setattr(trainer, "_policy_forward", counted_forward)
        trainer._buffered_inputs, trainer._step = [b, b], 0
        trainer._compute_loss(trainer.model, b)
        assert trainer._decides_on_old_policy() == (policy == "old") and forwards == [1]  # the loss's own forward
        valid, positive = mask.bool(), (batch["advantages"] > 0)[:, None] & mask.bool()
        decided = lp if policy == "current" else old
        expected = positive & (decided < torch.log(torch.tensor(tau_p)))
        assert torch.equal(outs[-1].s2t.spurious, expected), policy
        assert torch.equal(outs[-1].loss_mask, valid & ~expected)
        found[policy] = expected
    assert not torch.equal(found["current"], found["old"]) and found["old"].any() and found["current"].any()
