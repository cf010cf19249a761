"""The vLLM training checks, run inside the vLLM venv (.venv-vllm, built by `scripts/setup.sh vllm`)
with ONE engine start; tests/engines/trl/test_train_vllm.py runs this from the main venv and asserts on the JSON
it writes (raw observations, no verdicts: the tolerances live in the test file).

    python tests/engines/trl/vllm_train_checks.py OUT.json WORK_DIR

One `stapo train demo use_vllm=true` run through the CLI (2 optimizer steps, 32-token completions,
no held-out eval). Around it, through a wrapper of `STAPOTrainer.train`: the per-token log-probs of
one fixed completion under the vLLM engine and under the trainer's model, before training, after
the last step but before the final sync, and after the run; the global step at every weight sync; and,
after the run, the check of the private symbols the engine relies on (stapo.engines.trl.internals), the
vLLM ones included, on the trainer.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

MAX_STEPS = 2
TRAIN_ARGS = ["use_vllm=true", f"max_steps={MAX_STEPS}", "max_completion_length=32", "learning_rate=1e-4",
              "eval_data=null", "plots=false"]
FIXED_PROMPT = "What is 3 + 4? Put the final answer in \\boxed{}."
FIXED_COMPLETION = " 3 + 4 = 7, so the answer is \\boxed{7}."


def vllm_logprobs(llm, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """Per-token log-probs of `completion_ids` after `prompt_ids` under the engine's current weights."""
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt_ids + completion_ids}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, seed=0),
                       use_tqdm=False)[0]  # own seed: the rollouts' random stream is left alone
    return [d[t].logprob for d, t in zip(out.prompt_logprobs[len(prompt_ids):], completion_ids)]


def trainer_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """The same under the trainer's model (its forward, log-softmax in float64)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0, len(prompt_ids) - 1 : -1].double()
        return logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0].tolist()


def main(out_path: str, work_dir: str) -> None:
    started = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from transformers import TrainerCallback

    from stapo.cli import main as stapo_main
    from stapo.engines.trl import STAPOTrainer

    report: dict = {"logprobs": {}, "sync_steps": []}
    real_train = STAPOTrainer.train

    def score(trainer, key):
        tok = trainer.processing_class
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": FIXED_PROMPT}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
        completion_ids = tok(FIXED_COMPLETION, add_special_tokens=False)["input_ids"]
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        report["logprobs"][key] = {"vllm": vllm_logprobs(trainer.vllm_generation.llm, prompt_ids, completion_ids),
                                   "trainer": trainer_logprobs(model, prompt_ids, completion_ids)}
        model.train(was_training)

    class ScoreAfterLastStep(TrainerCallback):  # before SyncAtTrainEnd (on_train_end) pushes the last update
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                score(self.trainer, "last_step_unsynced")

    def train(self, *args, **kwargs):
        report["engine"] = {"dtype": str(self.vllm_generation.llm.llm_engine.model_config.dtype),
                            "enforce_eager": self.vllm_generation.llm.llm_engine.model_config.enforce_eager}
        sync = self.vllm_generation.sync_weights

        def counted_sync():
            report["sync_steps"].append(self.state.global_step)
            t0 = time.perf_counter()
            sync()
            report.setdefault("sync_s", []).append(time.perf_counter() - t0)

        self.vllm_generation.sync_weights = counted_sync
        self.add_callback(ScoreAfterLastStep(self))
        score(self, "before")
        t0 = time.perf_counter()
        result = real_train(self, *args, **kwargs)
        report["train_s"] = time.perf_counter() - t0
        report["global_step"] = self.state.global_step
        from stapo.engines.trl.internals import checked_internals, internal_problems

        report["internals"] = {"checked": [item.name() for item in checked_internals(self)],
                               "problems": internal_problems(self)}
        score(self, "after")
        return result

    STAPOTrainer.train = train
    from stapo.engines.trl import STAPOConfig
    from stapo.engines.trl.vllm import check_vllm_args

    try:  # no engine needed: refused before the model loads
        check_vllm_args(STAPOConfig(output_dir=str(work / "server"), use_vllm=True, vllm_mode="server",
                                    use_cpu=True, bf16=False))
        report["server_mode_error"] = None
    except ValueError as err:
        report["server_mode_error"] = str(err)
    out_dir = work / "run"
    t0 = time.perf_counter()
    report["rc"] = stapo_main(["train", "demo", *TRAIN_ARGS, f"output_dir={out_dir}"])
    report["cli_s"] = time.perf_counter() - t0
    metrics = out_dir / "metrics.jsonl"
    report["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    summary = out_dir / "summary.json"
    report["summary"] = json.loads(summary.read_text()) if summary.exists() else None

    import vllm

    report["info"] = {"vllm_version": vllm.__version__, "total_s": time.perf_counter() - started,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
