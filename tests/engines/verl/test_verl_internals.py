"""The canary for the verl plugin's reliance on verl's internals (stapo.engines.verl.internals): every symbol
it lists is in the installed verl with the parameters and keys the plugin relies on; one taken away or
changed is named, by the check and, at import, in a warning. (The engine's own attributes are checked on
verl's real FSDP engine in test_verl_engine.py.)"""

from __future__ import annotations

import pytest
from verl_fakes import VERL_MODULE, VERL_SKIP_REASON

pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)

import os
import subprocess
import sys
from dataclasses import replace

import stapo.engines.verl  # noqa: F401 - installs the hook (the checks must see through its wrappers)
from stapo.engines.private_symbols import (
    INSTANCE,
    ChangedPrivateSymbolWarning,
    source_symbol_problems,
    symbol_problems,
)
from stapo.engines.verl.internals import INTERNALS, internal_problems, warn_on_changed_internals

# Importing verl's Ray driver needs its serving stack (uvicorn), which the test environment does not install:
# its symbols are checked from its source file.
SOURCE_ONLY = ("verl.trainer.ppo.ray_trainer",)


def _module(item):
    return item.owner.partition(":")[0]


def test_every_verl_symbol_the_plugin_relies_on_is_there():
    imported = tuple(s for s in INTERNALS if s.owner != INSTANCE and _module(s) not in SOURCE_ONLY)
    from_source = tuple(s for s in INTERNALS if _module(s) in SOURCE_ONLY)
    assert imported and from_source
    assert symbol_problems(imported) == []
    assert source_symbol_problems(from_source) == []


def test_the_wrapped_train_batch_is_checked_as_verls():
    """The hook replaces BaseEngine.train_batch; the check sees verl's function through the wrapper."""
    from verl.workers.engine.base import BaseEngine

    assert getattr(BaseEngine.train_batch, "_stapo_hook", False)
    assert BaseEngine.train_batch.__wrapped__.__module__ == "verl.workers.engine.base"
    assert internal_problems("verl.workers.engine.base") == []


def _problem(problems, name):
    found = [p for p in problems if p.startswith(name + " ")]
    assert found, problems
    return found[0]


def test_a_removed_or_changed_symbol_is_named(monkeypatch):
    import verl.workers.engine.base as engine_base
    import verl.workers.utils.losses as verl_losses
    import verl.workers.utils.padding as padding

    monkeypatch.delattr(padding, "no_padding_2_padding")
    monkeypatch.setattr(engine_base.BaseEngine, "infer_batch", lambda self, data: None)

    def ppo_loss(config, model_output, data, dp_group=None):  # reads no "entropy" any more
        return model_output["log_probs"], data["old_log_probs"], data["advantages"], data["response_mask"]

    monkeypatch.setattr(verl_losses, "ppo_loss", ppo_loss)
    problems = internal_problems()
    assert "is missing" in _problem(problems, "verl.workers.utils.padding.no_padding_2_padding")
    changed = _problem(problems, "verl.workers.engine.base.BaseEngine.infer_batch")
    assert "has parameters (self, data); stapo relies on (self, data, loss_function)" in changed
    assert "no longer names the key(s) ['entropy'," in _problem(problems, "verl.workers.utils.losses.ppo_loss")
    with pytest.warns(ChangedPrivateSymbolWarning) as warned:
        warn_on_changed_internals("verl.workers.utils.padding")
    (message,) = (str(w.message) for w in warned)
    assert "verl.workers.utils.padding.no_padding_2_padding is missing" in message


def test_the_source_check_names_a_changed_driver_symbol(tmp_path, monkeypatch):
    """The check from a source file (the driver's, here a stand-in): a changed signature, a lost key, a
    missing method are named."""
    (tmp_path / "stand_in_driver.py").write_text(
        "class RayPPOTrainer:\n"
        "    def _compute_old_log_prob(self, batch, step):\n"
        "        return {'old_log_probs': batch, 'entropy': step}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (driver,) = (s for s in INTERNALS if s.symbol == "_compute_old_log_prob")
    stand_in = replace(driver, owner="stand_in_driver:RayPPOTrainer")
    (changed,) = source_symbol_problems((stand_in,))
    assert changed.startswith("stand_in_driver.RayPPOTrainer._compute_old_log_prob has parameters (self, batch, step)")
    (lost_key,) = source_symbol_problems((replace(stand_in, params=("self", "batch", "step")),))
    assert "no longer names the key(s) ['entropys']" in lost_key
    (missing,) = source_symbol_problems((replace(stand_in, symbol="_compute_ref_log_prob"),))
    assert missing.startswith("stand_in_driver.RayPPOTrainer._compute_ref_log_prob is missing")


def test_at_import_a_changed_symbol_is_a_warning_naming_it():
    """In a fresh interpreter: a verl module imported before the plugin is checked when the plugin installs its
    hook, one imported after it when verl imports it; a warning each, and the import goes on. (verl's own
    plugin discovery is off, so that the plugin is imported where the test says.)"""
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "import verl.workers.utils.padding as padding\n"
        "del padding.no_padding_2_padding\n"
        "import stapo.engines.verl\n"
        "from stapo.engines.verl import internals\n"
        "from stapo.engines.private_symbols import PrivateSymbol\n"
        "internals.INTERNALS += (PrivateSymbol('verl.workers.engine.utils', 'no_such_function', ()),)\n"
        "import verl.workers.engine.utils\n"
        "print('imported')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", VERL_USE_EXTERNAL_PLUGINS="none")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("imported"), result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "ChangedPrivateSymbolWarning" in line]
    assert any("verl.workers.utils.padding.no_padding_2_padding is missing" in w for w in warnings), result.stderr
    assert any("verl.workers.engine.utils.no_such_function is missing" in w for w in warnings), result.stderr
