"""S2TSettings: one set of defaults and ranges, one message per bad value naming the field."""

import math

import pytest

from stapo.core import PRESETS, S2T_DEFAULTS, S2TSettings, s2t_errors

BAD = [
    ("tau_p", -0.1), ("tau_p", 1.5), ("tau_p", float("nan")), ("tau_p", True), ("tau_p", "0.01"),
    ("tau_h", -1.0), ("tau_h", float("inf")), ("tau_h", "low"),
    ("tau_h_quantile", 1.01), ("tau_h_quantile", -0.5), ("tau_h_quantile", None),
    ("tau_h_population", "all"), ("tau_h_population", None),
    ("inert_warning_steps", -1), ("inert_warning_steps", 2.5), ("inert_warning_steps", None),
]


def test_defaults_are_the_papers():
    s = S2TSettings()
    assert (s.tau_p, s.tau_h, s.tau_h_quantile) == (0.01, None, 0.05)
    assert S2T_DEFAULTS["tau_p"] == 0.01 and S2T_DEFAULTS["tau_h_population"] == s.tau_h_population
    assert PRESETS["stapo"].s2t == s


@pytest.mark.parametrize("name, value", BAD)
def test_every_bad_value_names_its_field(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*got {repr(value).replace('(', '.').replace(')', '.')}"):
        S2TSettings(**{name: value})


@pytest.mark.parametrize("name, value", [b for b in BAD if b[1] is not None])
def test_config_level_errors(name, value):
    errors = s2t_errors({name: value})
    assert list(errors) == [name] and errors[name].startswith("must be")


def test_none_means_default_in_configs():
    assert s2t_errors({"tau_p": None, "tau_h": None, "tau_h_quantile": None, "tau_h_population": None}) == {}
    s = S2TSettings.resolve({"tau_p": None, "tau_h_quantile": 0.2})
    assert (s.tau_p, s.tau_h_quantile) == (0.01, 0.2)


def test_edges_are_accepted():
    assert S2TSettings(tau_p=0.0).tau_p == 0.0  # 0 silences nothing
    assert S2TSettings(tau_p=1, tau_h=0, tau_h_quantile=1).tau_h == 0.0
    assert isinstance(S2TSettings(tau_p=1).tau_p, float)


def test_resolve_keeps_base_and_refuses_unknown_names():
    base = S2TSettings(tau_p=0.02, tau_h=0.3)
    assert S2TSettings.resolve(base=base, tau_h_quantile=0.1) == S2TSettings(tau_p=0.02, tau_h=0.3, tau_h_quantile=0.1)
    with pytest.raises(ValueError, match="unknown S2T setting.*tau_x"):
        S2TSettings.resolve(tau_x=1)
    assert not math.isnan(S2TSettings.resolve().tau_p)
