"""S2TSettings: one set of defaults and ranges, one message per bad value naming the field."""

import dataclasses
import math

import pytest

from stapo.core import PRESETS, S2T_DEFAULTS, S2T_READINGS, S2TSettings, s2t_errors

BAD = [
    ("tau_p", -0.1), ("tau_p", 1.5), ("tau_p", float("nan")), ("tau_p", True), ("tau_p", "0.01"),
    ("tau_h", -1.0), ("tau_h", float("inf")), ("tau_h", "low"),
    ("tau_h_quantile", 1.01), ("tau_h_quantile", -0.5), ("tau_h_quantile", None),
    ("tau_h_population", "all"), ("tau_h_population", None),
    ("tau_h_max", -0.1), ("tau_h_max", float("nan")), ("tau_h_max", None),
    ("inert_warning_steps", -1), ("inert_warning_steps", 2.5), ("inert_warning_steps", None),
]


def test_defaults_are_the_papers():
    s = S2TSettings()
    assert (s.tau_p, s.tau_h, s.tau_h_quantile) == (0.002, None, 0.75)
    # the paper's rule: the bottom 75% of the candidates' entropies per mini-batch, no cap
    assert (s.tau_h_population, s.tau_h_max, s.tau_h_scope) == ("candidates", math.inf, "mini_batch")
    assert S2T_DEFAULTS["tau_p"] == 0.002 and S2T_DEFAULTS["tau_h_population"] == s.tau_h_population
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
    assert (s.tau_p, s.tau_h_quantile) == (0.002, 0.2)


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


def test_inert_monitor_warns_once_per_streak():
    from stapo.core.monitor import InertS2TMonitor

    mon = InertS2TMonitor(S2TSettings(inert_warning_steps=3))
    quiet = dict(n_valid=1000, n_low_prob=12, n_candidates=5, threshold=0.01, suggest_tau_h=lambda: 0.4)
    out = [mon.update(0, **quiet) for _ in range(5)]
    assert out[:2] == [None, None] and out[3:] == [None, None]
    assert "no token for 3 optimizer steps" in out[2] and "12 with p < tau_p" in out[2] and "0.4 nats" in out[2]
    assert mon.update(2, **quiet) is None  # something silenced: the streak restarts
    assert [mon.update(0, **quiet) for _ in range(3)][-1] is not None
    off = InertS2TMonitor(S2TSettings(inert_warning_steps=0))
    assert all(off.update(0, **quiet) is None for _ in range(50))
    busy = InertS2TMonitor(S2TSettings(inert_warning_steps=1))
    assert busy.update(1, **quiet) is None


def test_inert_monitor_names_no_threshold_without_candidates():
    from stapo.core.monitor import InertS2TMonitor

    mon = InertS2TMonitor(dataclasses.replace(S2T_READINGS["former"], inert_warning_steps=1))
    line = mon.update(0, n_valid=128, n_low_prob=0, n_candidates=0, threshold=0.0, suggest_tau_h=lambda: None)
    assert "of candidates entropies per mini-batch, at most 0.693 nats);" in line and "= 0 nats" not in line
    assert "no tau_h reaches" in line
