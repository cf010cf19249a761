"""One validator for the S2T settings: every bad value of every field gets the same message, naming
the field, in the run config (`stapo train`), the TRL STAPOConfig, the verl `stapo` block and
`stapo analyze` — all from `stapo.core.settings`."""

from __future__ import annotations

import argparse
import re

import pytest

from stapo.core import S2T_FIELDS, s2t_field_error

BAD = {
    "tau_p": [-0.5, 1.5, float("nan")],
    "tau_h": [-1.0, float("inf")],
    "tau_h_quantile": [-0.1, 2.0],
    "tau_h_population": ["everything"],
    "tau_h_max": [-1.0, float("nan")],
    "tau_h_scope": ["step"],
    "decision_policy": ["newest"],
    "inert_warning_steps": [-3],
}
CASES = [(name, value) for name, values in BAD.items() for value in values]
ANALYZE_FLAGS = ("tau_p", "tau_h", "tau_h_quantile", "tau_h_population", "tau_h_max")


def test_every_field_has_bad_values_here():
    assert set(BAD) == set(S2T_FIELDS)


@pytest.mark.parametrize("name, value", CASES)
def test_run_config(name, value, tmp_path):
    from stapo.config import ConfigError, validate

    raw = {"model": "embedded", "train_data": "synthetic:add1?n=8", "output_dir": str(tmp_path / "r"), name: value}
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert info.value.errors == [f"{name}: {s2t_field_error(name, value)}, got {value!r}"]


@pytest.mark.parametrize("name, value", CASES)
def test_trl_config(name, value, tmp_path):
    pytest.importorskip("trl")
    from stapo.engines.trl import STAPOConfig

    with pytest.raises(ValueError, match="^" + re.escape(f"{name} {s2t_field_error(name, value)}, got {value!r}")):
        STAPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{name: value})


@pytest.mark.parametrize("name, value", CASES)
def test_verl_config(name, value):
    pytest.importorskip("verl")
    from stapo.engines.verl.config import VerlStapoSettings

    with pytest.raises(ValueError, match=re.escape(f"stapo.{name} {s2t_field_error(name, value)}, got {value!r}")):
        VerlStapoSettings(**{name: value})


@pytest.mark.parametrize("name, value", [c for c in CASES if c[0] in ANALYZE_FLAGS])
def test_analyze_flags(name, value):
    from stapo.cli import UserError
    from stapo.commands.analyze import s2t_settings_from_args

    args = argparse.Namespace(**{n: None for n in ANALYZE_FLAGS})
    setattr(args, name, value)
    with pytest.raises(UserError) as info:
        s2t_settings_from_args(args)
    flag = "--" + name.replace("_", "-")
    assert str(info.value) == f"{flag} {s2t_field_error(name, value)}, got {value!r}"
