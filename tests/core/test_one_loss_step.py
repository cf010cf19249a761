"""One loss step: both engines compose a micro-batch's loss only through `stapo.core.filtered_policy_loss`
(token filter -> clipped loss -> aggregation), never with a token filter or the clipped loss of their own,
and the README's "use the math in your own trainer" example calls the same function."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import stapo.core.losses as core_losses
from stapo.core import TOKEN_FILTERS

ENGINES = Path(__file__).resolve().parents[2] / "src" / "stapo" / "engines"
README = Path(__file__).resolve().parents[2] / "README.md"
# the clipped loss, the losses with a filter named, the filters and masks: what an engine must not call itself
FORBIDDEN = {"policy_loss", "stapo_loss", "high_entropy_loss", "aggregate", "apply_token_filter", "s2t_mask",
             "high_entropy_mask"} | {spec.fn.__name__ for spec in TOKEN_FILTERS.values()}


def called_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_the_engines_call_only_the_core_step():
    modules = sorted(ENGINES.rglob("*.py"))
    assert len(modules) > 5
    callers = []
    for path in modules:
        names = called_names(path)
        bad = names & (FORBIDDEN | {"filter_spec", "token_filter"})  # a filter spec called directly
        assert not bad, f"{path.relative_to(ENGINES)} calls {sorted(bad)} itself"
        if "filtered_policy_loss" in names:
            callers.append(path.parent.name)
    assert set(callers) == {"trl", "verl"}  # each engine calls the core step


def test_the_check_sees_a_direct_call(tmp_path):
    planted = tmp_path / "engine.py"
    planted.write_text("from stapo.core import policy_loss\nloss, m = policy_loss(lp, old, adv, mask)\n")
    assert "policy_loss" in called_names(planted) & FORBIDDEN


def test_the_step_is_one_short_function_and_the_readme_calls_it():
    assert len(inspect.getsource(core_losses.filtered_policy_loss).splitlines()) <= 60
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert any("filtered_policy_loss(" in block for block in blocks)
