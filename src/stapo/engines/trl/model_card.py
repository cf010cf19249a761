"""The model card (README.md) of a run directory: what `push_to_hub` publishes.

TRL's card knows only the trainer class ("trained with GRPO") and, for a local model directory, no
base model at all. This one is written from the run's own records:

    config.yaml   the resolved run config: base model, data, method, S2T thresholds, clip range, ...
                  (absent when STAPOTrainer is used directly: the trainer's STAPOConfig stands in)
    eval.json     held-out accuracy before / after training, when measured
    the trainer   steps done, LoRA settings when the model is a PEFT model

`STAPOTrainer.create_model_card` calls `write_model_card`; the recipe calls it again once the
held-out results are in. Written atomically (`stapo.rundir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stapo.core import PRESETS, S2T_FIELDS
from stapo.rundir import EVAL_FILE, MODEL_CARD_FILE, atomic_write_text, read_json, read_run_config

__all__ = ["MODEL_CARD_FILE", "model_card_facts", "render_model_card", "write_model_card"]

EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `model: embedded` is (stapo.models)


def model_card_facts(trainer) -> dict[str, Any]:
    """Everything the card states, from the run directory's records and the trainer."""
    args = trainer.args
    run_dir = Path(args.output_dir)
    config = read_run_config(run_dir)  # a damaged config.yaml is an error naming it, not an empty card
    model = trainer.model
    peft_config = getattr(model, "peft_config", None)
    lora = None
    if isinstance(peft_config, dict) and peft_config:
        adapter = next(iter(peft_config.values()))
        targets = getattr(adapter, "target_modules", None)
        lora = {"r": getattr(adapter, "r", None), "lora_alpha": getattr(adapter, "lora_alpha", None),
                "lora_dropout": getattr(adapter, "lora_dropout", None),
                "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}
    base = config.get("model")
    if base is None:
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    settings = args.s2t_settings
    return {
        "base_model": base,
        "method": args.method,
        "s2t_applied": PRESETS[args.method].filter.applies_s2t,
        "s2t": {name: getattr(settings, name) for name in S2T_FIELDS if name != "inert_warning_steps"},
        "options": {
            "loss_type": args.loss_type, "epsilon": args.epsilon, "epsilon_high": args.epsilon_high,
            "clip_ratio_c": args.clip_ratio_c, "scale_rewards": args.scale_rewards,
            "learning_rate": args.learning_rate, "num_generations": args.num_generations,
            "max_completion_length": args.max_completion_length, "temperature": args.temperature,
            "seed": args.seed,
        },
        "train_data": config.get("train_data"),
        "eval_data": config.get("eval_data"),
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps or args.max_steps,
        "eval": read_json(run_dir / EVAL_FILE) if (run_dir / EVAL_FILE).is_file() else {},
        "lora": lora,
    }


def _hub_id(name: str | None) -> str | None:
    """A hub model id for the card's metadata (`owner/name`), not a local path."""
    if name == "embedded":
        return EMBEDDED_BASE_MODEL
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def render_model_card(facts: dict[str, Any]) -> str:
    """The card's markdown (with the hub's YAML metadata block)."""
    method = facts["method"]
    preset = PRESETS[method]
    base = facts.get("base_model")
    hub_base = _hub_id(base)
    meta: dict[str, Any] = {}
    if hub_base:
        meta["base_model"] = hub_base
    meta["library_name"] = "peft" if facts.get("lora") else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["stapo", "trl", "grpo", "reinforcement-learning", f"method:{method}"]
    if facts.get("lora"):
        meta["tags"].append("lora")

    if base == "embedded":
        base_text = f"`{EMBEDDED_BASE_MODEL}` (stapo's embedded copy, dequantized from its Q4_1 GGUF)"
    elif base:
        base_text = f"`{base}`" + ("" if hub_base else " (a local directory)")
    else:
        base_text = "unknown"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    base_name = base.split('/')[-1] if base and base != 'embedded' else hub_base or 'a model'
    lines += [f"# {method} fine-tune of {base_name}",
              "",
              f"Reinforcement learning on verifiable rewards with stapo "
              f"(TRL's GRPO trainer with the loss of `stapo.core`), method preset **{method}**.",
              "",
              "## Training",
              "",
              f"- **Base model:** {base_text}"]
    if facts.get("lora"):
        lora = facts["lora"]
        lines.append(f"- **Weights trained:** a LoRA adapter (r={lora['r']}, alpha={lora['lora_alpha']}, "
                     f"dropout={lora['lora_dropout']}, target modules: {lora['target_modules']}); the base "
                     "weights are unchanged")
    else:
        lines.append("- **Weights trained:** all")
    lines.append(f"- **Method:** `{method}`: {preset.description}")
    s2t = facts["s2t"]
    cap = s2t.get("tau_h_max")
    threshold_h = (f"tau_h = {s2t['tau_h']} nats" if s2t.get("tau_h") is not None
                   else f"tau_h = the {s2t['tau_h_quantile']} quantile of the {s2t['tau_h_population']} tokens' "
                        "entropies" + (f", at most {cap:.4g} nats" if cap is not None and cap != float("inf") else ""))
    if facts["s2t_applied"]:
        lines.append(f"- **S2T thresholds (applied):** tokens with A > 0, p < tau_p = {s2t['tau_p']} and H below "
                     f"{threshold_h} are silenced and the loss renormalised over the remaining tokens")
    else:
        lines.append(f"- **S2T thresholds (measured only, not applied):** tau_p = {s2t['tau_p']}, {threshold_h}")
    opts = facts["options"]
    lines.append("- **Optimisation:** " + ", ".join(f"{k} = {v}" for k, v in opts.items() if v is not None))
    lines.append(f"- **Training data:** `{facts.get('train_data') or 'not recorded'}`")
    lines.append(f"- **Steps:** {facts['global_step']}"
                 + (f" of {facts['max_steps']}" if facts.get("max_steps") and facts["max_steps"] > 0 else ""))
    lines += ["", "## Held-out results", ""]
    ev = facts.get("eval") or {}
    if ev and facts.get("eval_data"):
        lines.append(f"Data: `{facts['eval_data']}`; accuracy = mean over problems of the fraction of correct samples "
                     "(± standard error over problems).")
        lines += ["", "| when | accuracy | problems | samples per problem |", "|---|---|---|---|"]
        for when in ("before", "after"):
            if when in ev:
                r = ev[when]
                lines.append(f"| {when} training | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {r['problems']} | "
                             f"{r['samples_per_problem']} |")
    else:
        lines.append("Not measured during training (no eval_data); evaluate the checkpoints with `stapo eval`.")
    lines += ["", "Reproduce: `stapo train config.yaml` with the `config.yaml` of the run directory.", ""]
    return "\n".join(lines)


def write_model_card(trainer, *also: str | Path) -> Path | None:
    """Write the card to `<output_dir>/README.md` (and into each directory of `also`); main process only."""
    if not trainer.is_world_process_zero():
        return None
    text = render_model_card(model_card_facts(trainer))
    path = atomic_write_text(Path(trainer.args.output_dir) / MODEL_CARD_FILE, text)
    for directory in also:
        if Path(directory).is_dir():
            atomic_write_text(Path(directory) / MODEL_CARD_FILE, text)
    return path
