"""One rule per shared loss setting: `stapo train`'s run config, the TRL `STAPOConfig`, the verl config and
the core accept and refuse the same values, each with the rule's message naming the field in its own
spelling. The rules are `stapo.core.loss_settings`'; the edge values below are written here, from the
settings' meanings, not read from it.

    setting (core)        run config / STAPOConfig    verl                                   core
    clip_low              epsilon                     actor.clip_ratio_low (or clip_ratio)   policy_loss(clip_low=)
    clip_high             epsilon_high                actor.clip_ratio_high                  policy_loss(clip_high=)
    clip_ratio_c          clip_ratio_c                actor.clip_ratio_c                     policy_loss(clip_ratio_c=)
    top_entropy_quantile  top_entropy_quantile        actor.policy_loss.stapo.top_entropy_quantile
                                                                                           high_entropy_loss(top_entropy_quantile=)
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from stapo.core.loss_settings import (
    LOSS_SETTING_FIELDS,
    check_clip_high,
    check_clip_low,
    check_clip_ratio_c,
    check_top_entropy_quantile,
    loss_setting_error,
)

INF, NAN = math.inf, math.nan
# setting -> (accepted, refused). A clip epsilon of 0 clips at r = 1, an infinite one clips nothing; an
# infinite dual-clip bound is no dual clip; a rho of 0 keeps no token, so it is refused.
EDGES = {
    "clip_low": ([0, 0.0, 0.2, 1.5, INF], [-0.1, -INF, NAN, True]),
    "clip_high": ([0, 0.28, 3, INF], [-0.1, -1e-9, NAN, False]),
    "clip_ratio_c": ([1.01, 3, 10.0, INF], [1, 1.0, 0.5, -3, NAN, True]),
    "top_entropy_quantile": ([1, 1.0, 0.2, 1e-6], [0, 0.0, -0.1, 1.5, 1.0000001, INF, NAN, True]),
}
CASES = [(s, v, ok) for s, (good, bad) in EDGES.items() for ok, values in ((True, good), (False, bad)) for v in values]
IDS = [f"{s}={v!r}-{'ok' if ok else 'bad'}" for s, v, ok in CASES]

TRL_NAME = {"clip_low": "epsilon", "clip_high": "epsilon_high", "clip_ratio_c": "clip_ratio_c",
            "top_entropy_quantile": "top_entropy_quantile"}
VERL_ACTOR_KEY = {"clip_low": "clip_ratio_low", "clip_high": "clip_ratio_high", "clip_ratio_c": "clip_ratio_c"}
CHECKS = {"clip_low": check_clip_low, "clip_high": check_clip_high, "clip_ratio_c": check_clip_ratio_c,
          "top_entropy_quantile": check_top_entropy_quantile}


def _method(setting: str) -> str:
    return "20-entropy" if setting == "top_entropy_quantile" else "stapo"  # the one method that reads rho


def _expect(ok: bool, call, message: str):
    """`call()` returns when `ok`; otherwise it raises a ValueError whose text contains `message`."""
    if ok:
        return call()
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value), (message, str(info.value))


def test_every_shared_setting_has_edge_values_here():
    assert set(EDGES) == set(LOSS_SETTING_FIELDS) == set(TRL_NAME)


@pytest.mark.parametrize("setting, value, ok", CASES, ids=IDS)
def test_the_rule(setting, value, ok):
    problem = loss_setting_error(setting, value)
    assert (problem is None) == ok
    _expect(ok, lambda: CHECKS[setting](value), f"{setting} {problem}, got {value!r}")
    # the caller's spelling names the field
    _expect(ok, lambda: CHECKS[setting](value, "epsilon"), f"epsilon {problem}, got {value!r}")


@pytest.mark.parametrize("setting, value, ok", CASES, ids=IDS)
def test_run_config_with_an_override(setting, value, ok):
    """`stapo train demo <name>=<value>`: the command line's text, read as the YAML scalar it is."""
    from stapo.config import ConfigError, load_config

    name = TRL_NAME[setting]
    text = {INF: ".inf", -INF: "-.inf"}.get(value, "") or (".nan" if value != value else repr(value).lower())
    overrides = [f"method={_method(setting)}", f"{name}={text}"]
    if ok:
        run = load_config("demo", overrides)
        assert run.trl[name] == value
        return
    with pytest.raises(ConfigError) as info:
        load_config("demo", overrides)
    assert info.value.errors == [f"{name}: {loss_setting_error(setting, value)}, got {value!r}"]


@pytest.mark.parametrize("setting, value, ok", CASES, ids=IDS)
def test_trl_config(setting, value, ok, tmp_path):
    pytest.importorskip("trl")
    from stapo.engines.trl import STAPOConfig

    name = TRL_NAME[setting]
    make = lambda: STAPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False,  # noqa: E731
                               method=_method(setting), **{name: value})
    problem = loss_setting_error(setting, value)
    if ok:
        assert getattr(make(), name) == value
        return
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} {problem}, got {value!r}")):
        make()


@pytest.mark.parametrize("setting, value, ok", CASES, ids=IDS)
def test_verl_config(setting, value, ok):
    pytest.importorskip("verl")
    from stapo.engines.verl.config import VerlStapoSettings, actor_clip_settings

    problem = loss_setting_error(setting, value)
    if setting == "top_entropy_quantile":
        _expect(ok, lambda: VerlStapoSettings(top_entropy_quantile=value),
                f"stapo.top_entropy_quantile {problem}, got {value!r}")
        return
    key = VERL_ACTOR_KEY[setting]
    got = _expect(ok, lambda: actor_clip_settings({key: value}), f"actor.{key} {problem}, got {value!r}")
    if ok:
        assert got[setting] == value
    if setting == "clip_low":  # verl falls back to `clip_ratio` for both sides
        _expect(ok, lambda: actor_clip_settings({"clip_ratio": value}), f"actor.clip_ratio {problem}, got {value!r}")


@pytest.mark.parametrize("setting, value, ok", [c for c in CASES if c[0] != "top_entropy_quantile"],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] != "top_entropy_quantile"])
def test_verl_loss_reads_the_actor_config_by_the_same_rule(setting, value, ok):
    """The verl losses' own reading of the actor config (what they hand to stapo.core.policy_loss)."""
    pytest.importorskip("verl")
    from stapo.engines.verl.losses import core_loss_kwargs

    key = VERL_ACTOR_KEY[setting]
    got = _expect(ok, lambda: core_loss_kwargs({key: value}, "token-mean"),
                  f"actor.{key} {loss_setting_error(setting, value)}, got {value!r}")
    if ok:
        assert got[setting] == value


def _tiny_batch():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(2, 5, generator=g) - 0.1
    old = lp + 0.1 * torch.randn(2, 5, generator=g)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 5, dtype=torch.bool)
    ent = torch.rand(2, 5, generator=g)
    return lp, old, adv, mask, ent


@pytest.mark.parametrize("setting, value, ok", CASES, ids=IDS)
def test_core_losses(setting, value, ok):
    from stapo.core import high_entropy_loss, policy_loss

    lp, old, adv, mask, ent = _tiny_batch()
    message = f"{setting} {loss_setting_error(setting, value)}, got {value!r}"
    if setting == "top_entropy_quantile":
        call = lambda: high_entropy_loss(lp, old, adv, mask, ent, top_entropy_quantile=value)  # noqa: E731
    else:
        call = lambda: policy_loss(lp, old, adv, mask, **{setting: value})  # noqa: E731
    result = _expect(ok, call, message)
    if ok:
        assert torch.isfinite(result[0])
