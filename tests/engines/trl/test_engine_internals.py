"""The canary for the TRL engine's reliance on private symbols of TRL, transformers and vLLM
(stapo.engines.trl.internals): every symbol it lists is there with the parameters, type and keys the engine
relies on (the attributes on a trainer that has taken one optimizer step); one taken away or changed is
named, by the check and, at import, in a warning; and the list is complete: every private name the
engine's code uses on TRL's objects is in it. (The vLLM ones: tests/engines/trl/test_train_vllm.py, in the vLLM venv.)
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl import GRPOTrainer

import stapo.engines.trl as engine
from stapo.engines.private_symbols import INSTANCE, ChangedPrivateSymbolWarning
from stapo.engines.trl.internals import (
    BATCH_KEYS,
    FUSED_HEAD_SLOT,
    INTERNALS,
    checked_internals,
    internal_problems,
    warn_on_changed_internals,
)
from stapo.engines.trl.lm_head import TRLChunkedLogProbAdapter
from stapo.engines.trl.trainer import OLD_ENTROPY_KEY

ENGINE_DIR = Path(engine.__file__).parent


def _problem(problems, name):
    found = [p for p in problems if p.startswith(name + " ")]
    assert found, problems
    return found[0]


@pytest.fixture(scope="module")
def trained(tiny_qwen3_dir, tmp_path_factory):
    """A tiny trainer after one optimizer step of two micro-batches."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
    args = engine.STAPOConfig(output_dir=str(tmp_path_factory.mktemp("internals")), method="stapo",
                              per_device_train_batch_size=2, num_generations=2, gradient_accumulation_steps=2,
                              max_steps=1, max_completion_length=4, use_cpu=True, bf16=False, report_to=[],
                              save_strategy="no", capture_rollouts_every=0, seed=0)
    trainer = engine.STAPOTrainer(model=model, reward_funcs=lambda completions, **_: [1.0] * len(completions),
                                  args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 ="]}))
    trainer.train()
    assert trainer.state.global_step == 1
    return trainer


@pytest.mark.slow
def test_every_symbol_the_engine_relies_on_is_there_after_one_step(trained):
    checked = {item.name() for item in checked_internals(trained)}
    assert {item.name() for item in INTERNALS if not item.needs} <= checked  # all but vLLM's (not installed)
    assert internal_problems(trained) == []


@pytest.mark.slow
def test_a_trainers_attribute_taken_away_or_changed_is_named(trained, monkeypatch):
    monkeypatch.delattr(trained, "_buffered_inputs")
    monkeypatch.setattr(trained, "_step", "2")
    problems = internal_problems(trained)
    assert "is missing" in _problem(problems, "trainer._buffered_inputs")
    assert "is a str, not the builtins.int" in _problem(problems, "trainer._step")


def test_a_method_taken_away_or_changed_is_named_and_warned_about(monkeypatch):
    monkeypatch.delattr(GRPOTrainer, "_calculate_rewards")
    monkeypatch.setattr(Trainer, "_get_grad_norm", lambda self, model: None)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: inputs["prompt"])
    problems = internal_problems()
    assert "is missing" in _problem(problems, "trl.trainer.grpo_trainer.GRPOTrainer._calculate_rewards")
    assert "has parameters (self, model); stapo relies on (self, model, grad_norm)" in _problem(
        problems, "transformers.trainer.Trainer._get_grad_norm")
    assert "no longer names the key(s) ['prompt_ids'," in _problem(
        problems, "trl.trainer.grpo_trainer.GRPOTrainer._generate_and_score_completions")
    with pytest.warns(ChangedPrivateSymbolWarning) as warned:
        warn_on_changed_internals()
    messages = [str(w.message) for w in warned]
    assert len(messages) == len(problems) == 3
    assert all(problem in message for problem, message in zip(problems, messages))  # one warning per problem


@pytest.mark.slow
def test_at_import_a_changed_symbol_is_a_warning_naming_it():
    """In a fresh interpreter: importing stapo.engines.trl with a TRL method gone warns, naming it, and goes on."""
    code = (
        "from trl import GRPOTrainer\n"
        "del GRPOTrainer._calculate_rewards\n"
        "import stapo.engines.trl\n"
        "print('imported')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("imported"), result.stderr[-3000:]
    assert "ChangedPrivateSymbolWarning" in result.stderr
    assert "trl.trainer.grpo_trainer.GRPOTrainer._calculate_rewards is missing" in result.stderr


def test_the_lm_head_adapter_has_the_parameters_of_trls_slot():
    (slot,) = (item for item in INTERNALS if item.symbol == f"{FUSED_HEAD_SLOT}.forward")
    assert tuple(inspect.signature(TRLChunkedLogProbAdapter.apply).parameters) == slot.params[1:]  # less ctx


# ---- the list is complete ------------------------------------------------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _foreign_private_names(sources: list[str], bases: tuple[type, ...]) -> set[str]:
    """Private attribute names the code uses that it does not define itself (a method, or `self._x = ...`), and
    the private methods it defines that a base class has too (overrides)."""
    used, defined, own = set(), set(), set()
    for tree in map(ast.parse, sources):
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                used.add(node.attr)
                if isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    own.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
                key = node.args[1] if len(node.args) > 1 else None
                if isinstance(key, ast.Constant) and isinstance(key.value, str) and _private(key.value):
                    used.add(key.value)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and _private(node.name):
                defined.add(node.name)
    overrides = {name for name in defined if any(hasattr(base, name) for base in bases)}
    return (used - own - defined) | overrides


def _engine_sources() -> list[str]:
    return [path.read_text(encoding="utf-8") for path in sorted(ENGINE_DIR.glob("*.py"))]


def test_every_private_name_the_engine_uses_on_trls_objects_is_listed():
    from trl.generation.vllm_generation import VLLMGeneration

    listed = {part for item in INTERNALS for part in item.symbol.split(".")}
    foreign = _foreign_private_names(_engine_sources(), (GRPOTrainer, VLLMGeneration))
    assert foreign and foreign - listed == set()
    # the check finds a private name used on an object the engine does not own, and an override
    planted = "class T:\n    def _prepare_inputs(self, x):\n        return self.accelerator._models\n"
    assert _foreign_private_names([planted], (GRPOTrainer,)) == {"_prepare_inputs", "_models"}


def test_every_listed_override_is_overridden():
    for item in INTERNALS:
        if item.exact and item.owner in ("trl.trainer.grpo_trainer:GRPOTrainer", "transformers.trainer:Trainer"):
            assert item.symbol in engine.STAPOTrainer.__dict__, item.name()


def test_every_batch_key_the_engine_reads_is_listed():
    """The string keys read from TRL's batch (`inputs[...]`, `inputs.get(...)`, `... in inputs`) in the modules
    that get it are in BATCH_KEYS, except the ones the engine adds itself."""
    batch_names = {"inputs", "part", "out"}  # a micro-batch, a buffered one, the generation batch
    keys = set()
    for name in ("trainer.py", "rollouts.py"):
        tree = ast.parse((ENGINE_DIR / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Subscript) and getattr(node.value, "id", None) in batch_names
                    and isinstance(node.slice, ast.Constant)):
                keys.add(node.slice.value)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and getattr(node.func.value, "id", None) in batch_names and node.args
                  and isinstance(node.args[0], ast.Constant)):
                keys.add(node.args[0].value)
            elif (isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant)
                  and getattr(node.comparators[0], "id", None) in batch_names):
                keys.add(node.left.value)
    assert "old_per_token_logps" in keys
    assert keys - {OLD_ENTROPY_KEY, "stapo_rewards"} <= set(BATCH_KEYS)


def test_instance_attributes_are_checked_only_with_a_trainer():
    assert all(item.owner != INSTANCE for item in checked_internals())
