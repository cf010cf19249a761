"""Training steps of STAPOTrainer (method=grpo, method=stapo) and TRL's GRPOTrainer on a random Qwen3.

Each trainer gets an identical randomly initialised Qwen3 (a published shape from
gpu_lm_head.QWEN3_SHAPES, nothing downloaded; bf16 on CUDA), the same seed and the same data, and
is timed in two phases:

  train   trainer.train() on a synthetic task (stapo.data.synthetic_task), HF generation and the
          real reward (stapo.rewards); one step = generation, reward, loss, backward, optimizer
  update  the same fixed, already generated batch for all three (bench_trl_step.fixed_batch): loss
          (log-probs + entropies through the LM head), backward, gradient norm, optimizer step

STAPO runs with the memory-lean head in TRL's fused-head slot (fused_lm_head=True); TRL's GRPOTrainer
gets the grpo preset's loss settings (loss_type, clip range, reward scaling, beta), so the three
differ only in what the method changes. Per phase: the median step time over the steps after the
warm-up, tokens/s (prompt + completion positions the step ran through the model, over the timed
steps), peak memory (CUDA: torch.cuda.max_memory_allocated since the phase began; CPU: the process's
peak RSS so far, which only grows from one case to the next) and the ratios to TRL's GRPOTrainer.

    python benchmarks/gpu_train_step.py --device cuda --out-dir DIR       # Qwen3-1.7B shape, bf16
    python benchmarks/gpu_train_step.py --device cpu --tiny --steps 2     # CPU smoke run (the tests)

With --out-dir DIR, DIR/train_step.json and DIR/train_step.md are rewritten after every phase, so a
run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_trl_step import fixed_batch, qwen_tokenizer  # noqa: E402
from gpu_lm_head import QWEN3_SHAPES, random_qwen3, table  # noqa: E402

from stapo.rundir import atomic_write_text  # noqa: E402

GIB = 1024**3
TRAINERS = ("trl", "grpo", "stapo")  # trl = TRL's GRPOTrainer; grpo/stapo = STAPOTrainer(method=...)
PHASES = ("train", "update")


def loss_step(trainer, batch) -> None:
    """One update of the update phase: the loss on the fixed `batch`, its backward and the gradient norm
    (STAPO's end-of-step work hangs off it); the metrics the loss logged are dropped."""
    trainer.model.zero_grad(set_to_none=True)
    trainer._buffered_inputs = [batch]
    trainer._step = 0
    trainer._compute_loss(trainer.model, batch).backward()
    trainer._get_grad_norm(trainer.model)
    for values in trainer._metrics["train"].values():
        values.clear()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy model and batch (CPU smoke run)")
    p.add_argument("--shape", choices=sorted(QWEN3_SHAPES), default=None, help="Qwen3 shape (default 1.7b; tiny)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per trainer and phase")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --tiny 1)")
    p.add_argument("--rows", type=int, default=None, help="completions per step (default 8; --tiny 4)")
    p.add_argument("--num-generations", type=int, default=None, help="completions per prompt (default 4; --tiny 2)")
    p.add_argument("--completion-len", type=int, default=None, help="max completion tokens (default 128; --tiny 8)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="prompt tokens of the update batch (default 128; --tiny 16)")
    p.add_argument("--task", default="add2", help="synthetic task of the train phase (stapo.data.synthetic)")
    # Run order: the baseline, then STAPO, then the grpo control (a run cut short by a time limit
    # keeps the STAPO / TRL ratio); the tables list them in TRAINERS order.
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=["trl", "stapo", "grpo"])
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    tiny = dict(shape="tiny", warmup=1, rows=4, num_generations=2, completion_len=8, prompt_len=16)
    full = dict(shape="1.7b", warmup=2, rows=8, num_generations=4, completion_len=128, prompt_len=128)
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "rows", "num_generations", "completion_len", "prompt_len"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.rows % args.num_generations:
        p.error(f"--rows ({args.rows}) must be a multiple of --num-generations ({args.num_generations})")
    return args


class Memory:
    """Peak memory of a phase: CUDA allocator peak since `start`, or the process's peak RSS on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self):
        """GiB allocated now (what earlier cases left behind shows up here)."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated() / GIB
        return None

    def peak(self):
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def step_timer(memory):
    """A TrainerCallback recording the wall time of each optimizer step (device synchronised)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            memory.sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            memory.sync()
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def summarise(times, tokens, warmup):
    """{"median_ms", "tokens_per_s", "steps"} over the steps after the warm-up."""
    timed, toks = times[warmup:], tokens[warmup:] if tokens else None
    if not timed:
        return {"median_ms": None, "tokens_per_s": None, "steps": 0}
    tps = sum(toks) / sum(timed) if toks and len(toks) == len(timed) and all(t is not None for t in toks) else None
    return {"median_ms": statistics.median(timed) * 1e3, "tokens_per_s": tps, "steps": len(timed)}


def step_tokens(log_history):
    """Tokens each logged step ran through the model, from TRL's cumulative `num_tokens`."""
    seen = [e["num_tokens"] for e in log_history if "num_tokens" in e and "loss" in e]
    return [b - a for a, b in zip([0.0] + seen[:-1], seen)]


def build_dataset(args, tok):
    from datasets import Dataset

    from stapo.data import build_messages, format_prompt, synthetic_task

    n = args.rows // args.num_generations * (args.warmup + args.steps)
    rows = synthetic_task(args.task, n, seed=args.seed)
    as_messages = bool(getattr(tok, "chat_template", None))
    prompts = [build_messages(r["problem"]) if as_messages else format_prompt(r["problem"], tok) for r in rows]
    return Dataset.from_list([{"prompt": p, "answer": r["answer"]} for p, r in zip(prompts, rows)])


def build_trainer(name, args, device, tok, dataset, out_root):
    import torch
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from stapo.engines.trl import STAPOConfig, STAPOTrainer
    from stapo.rewards import trl_reward_fn

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    overrides = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if args.shape == "tiny":
        overrides.update(vocab_size=len(tok), max_position_embeddings=4 * (args.prompt_len + args.completion_len) + 512)
    model = random_qwen3(args.shape, device, dtype, seed=args.seed, **overrides)
    common = dict(
        output_dir=str(out_root / name), per_device_train_batch_size=args.rows, num_generations=args.num_generations,
        max_completion_length=args.completion_len, max_steps=args.warmup + args.steps, logging_steps=1,
        learning_rate=1e-6, seed=args.seed, report_to=[], save_strategy="no", disable_tqdm=True,
        bf16=cuda, gradient_checkpointing=cuda, use_cpu=not cuda, dataloader_num_workers=0,
    )
    if name == "trl":
        grpo = STAPOConfig(method="grpo", **{**common, "output_dir": str(out_root / "preset")})
        preset = {k: getattr(grpo, k) for k in ("loss_type", "epsilon", "epsilon_high", "scale_rewards", "beta")}
        cls, cfg = GRPOTrainer, GRPOConfig(**common, **preset)
    else:
        cls, cfg = STAPOTrainer, STAPOConfig(method=name, fused_lm_head=True, metrics_jsonl=False, **common)
    reward = trl_reward_fn(answer_key="answer", timeout=5.0, require_boxed=True)
    trainer = cls(model=model, reward_funcs=[reward], args=cfg, train_dataset=dataset, processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout; the tables say what matters
    return trainer


def run_trainer(name, args, device, tok, dataset, out_root, memory, res, on_phase=lambda: None):
    """Fills res[phase] for one trainer, calling on_phase() after each; a phase that raises records
    its error and the rest go on."""
    trainer = build_trainer(name, args, device, tok, dataset, out_root)
    if "train" in args.phases:
        rec = {"allocated_at_start_gib": memory.start()}
        try:
            timer = step_timer(memory)
            trainer.add_callback(timer)
            trainer.train()
            rec.update(summarise(timer.times, step_tokens(trainer.state.log_history), args.warmup))
            rec["peak_gib"] = memory.peak()
        except Exception as err:  # noqa: BLE001 - the phase records why it failed
            traceback.print_exc()
            rec["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:200]
        res["train"] = rec
        on_phase()
    if "update" in args.phases:
        rec = {"allocated_at_start_gib": memory.start()}
        try:
            batch = fixed_batch(args.rows, args.prompt_len, args.completion_len, len(tok), seed=args.seed + 1,
                                device=trainer.accelerator.device)
            optimizer = trainer.optimizer if trainer.optimizer is not None else trainer.create_optimizer()
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1
            tokens = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
            times = []
            for _ in range(args.warmup + args.steps):
                memory.sync()
                t0 = time.perf_counter()
                loss_step(trainer, batch)
                optimizer.step()
                memory.sync()
                times.append(time.perf_counter() - t0)
            rec.update(summarise(times, [tokens] * len(times), args.warmup))
            rec["peak_gib"] = memory.peak()
        except Exception as err:  # noqa: BLE001 - the phase records why it failed
            traceback.print_exc()
            rec["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:200]
        res["update"] = rec
        on_phase()
    del trainer


def ratios(cases):
    """Per phase: median step time and peak memory of each trainer over TRL's GRPOTrainer's."""
    out = {}
    for phase in PHASES:
        base = cases.get("trl", {}).get(phase, {})
        for name in ("grpo", "stapo"):
            rec = cases.get(name, {}).get(phase, {})
            for key in ("median_ms", "peak_gib"):
                if rec.get(key) is not None and base.get(key):
                    out[f"{phase}/{name}_over_trl/{key}"] = rec[key] / base[key]
        g, s = cases.get("grpo", {}).get(phase, {}), cases.get("stapo", {}).get(phase, {})
        if s.get("median_ms") is not None and g.get("median_ms"):
            out[f"{phase}/stapo_over_grpo/median_ms"] = s["median_ms"] / g["median_ms"]
    return out


LABELS = {"trl": "TRL GRPOTrainer", "grpo": "STAPOTrainer method=grpo", "stapo": "STAPOTrainer method=stapo"}


def markdown(results):
    m = results["meta"]
    lines = [f"# training step — {m['device']}, torch {m['torch']}, {m['date']}", f"command: {m['command']}",
             f"Qwen3 {m['shape']} (random init, {m['params_b']:.2f}B params, {m['dtype']}), {m['rows']} completions "
             f"per step ({m['num_generations']} per prompt), completions <= {m['completion_len']} tokens, "
             f"update batch {m['rows']} x ({m['prompt_len']} + {m['completion_len']}); "
             f"median over {m['steps']} steps after {m['warmup']} warm-up; peak memory: {m['memory']}", ""]
    rows = []
    for phase in PHASES:
        base = results["cases"].get("trl", {}).get(phase, {}).get("median_ms")
        for name in TRAINERS:
            rec = results["cases"].get(name, {}).get(phase)
            if rec is None:
                continue
            ms = rec.get("median_ms")
            rows.append([phase, LABELS[name], "error: " + rec["error"].replace("|", "/") if "error" in rec else
                         "-" if ms is None else f"{ms:.1f}",
                         "-" if rec.get("tokens_per_s") is None else f"{rec['tokens_per_s']:,.0f}",
                         "-" if rec.get("peak_gib") is None else f"{rec['peak_gib']:.2f}",
                         "-" if ms is None or not base else f"{ms / base:.3f}"])
    lines.append(table(["phase", "trainer", "median step ms", "tokens/s", "peak GiB", "x TRL GRPO"], rows))
    if results["ratios"]:
        lines += ["", "ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in sorted(results["ratios"].items()))]
    if m.get("wall_s") is not None:
        lines += ["", f"total wall time {m['wall_s']:.1f} s"]
    return "\n".join(lines) + "\n"


def write_outputs(results, out_dir):
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("train_step.json", json.dumps(results, indent=1, default=str)),
                       ("train_step.md", markdown(results))):
        atomic_write_text(out_dir / name, text)


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --tiny for a CPU smoke run")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory = Memory(device)
    t_start = time.perf_counter()
    tok = qwen_tokenizer()
    dataset = build_dataset(args, tok)
    cfg = dict(QWEN3_SHAPES[args.shape])
    vocab = cfg.get("vocab_size", len(tok))
    width, ffn, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    attn = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    params = vocab * width + layers * (width * (2 * attn + 2 * kv) + 3 * width * ffn)  # tied head
    results = {
        "meta": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/gpu_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "shape": args.shape, "params_b": params / 1e9, "dtype": "bf16" if device.type == "cuda" else "float32",
            "rows": args.rows, "num_generations": args.num_generations, "completion_len": args.completion_len,
            "prompt_len": args.prompt_len, "steps": args.steps, "warmup": args.warmup, "task": args.task,
            "memory": "torch.cuda.max_memory_allocated per phase" if device.type == "cuda"
            else "process peak RSS so far (grows across cases)", "wall_s": None,
        },
        "cases": {}, "ratios": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_train_step_") as tmp:
        def progress():
            results["ratios"] = ratios(results["cases"])
            write_outputs(results, args.out_dir)

        for name in args.trainers:
            res = results["cases"].setdefault(name, {})
            try:
                run_trainer(name, args, device, tok, dataset, Path(tmp), memory, res, progress)
            except Exception as err:  # noqa: BLE001 - the trainer could not be built: every phase records why
                traceback.print_exc()
                why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"[:200]
                res.update({phase: {"error": why} for phase in args.phases})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            progress()
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    write_outputs(results, args.out_dir)
    print(markdown(results))


if __name__ == "__main__":
    main()
