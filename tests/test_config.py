"""The run config: every field validated before anything heavy loads; overrides; bundled configs."""


import pytest
import yaml

from stapo.cli import main
from stapo.config import BUNDLED_CONFIG_DIR, ConfigError, dump_config, load_config, parse_overrides, validate


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


BASE = {"model": "embedded", "train_data": "synthetic:add1?n=8", "output_dir": "runs/x", "max_steps": 2,
        "num_generations": 4, "per_device_train_batch_size": 4}


def test_every_bundled_config_validates():
    paths = [p for p in BUNDLED_CONFIG_DIR.rglob("*.yaml") if p.parent.name != "accelerate"]
    assert len(paths) >= 13  # demo + 12 paper presets
    for p in paths:
        cfg = load_config(p)
        assert cfg.model and cfg.train_data


def test_paper_presets_differ_only_in_method_and_output_dir():
    for size in ("1.7b", "8b", "14b"):
        flats = {m: load_config(f"paper/qwen3-{size}-{m}").to_flat_dict()
                 for m in ("grpo", "20-entropy", "justrl", "stapo")}
        keys = set().union(*flats.values())
        for k in keys:
            values = {m: f.get(k) for m, f in flats.items()}
            if k not in ("method", "output_dir"):
                assert len({repr(v) for v in values.values()}) == 1, (size, k, values)
        assert {f["method"] for f in flats.values()} == {"grpo", "20-entropy", "justrl", "stapo"}


def test_overrides_are_typed_and_use_field_names(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["max_steps=3", "tau_p=0.02", "tau_h=null", "method=stapo",
                                              "learning_rate=1e-6", "output_dir=runs/y"])
    assert cfg.trl["max_steps"] == 3 and cfg.trl["tau_p"] == 0.02 and cfg.trl["tau_h"] is None
    assert cfg.trl["learning_rate"] == pytest.approx(1e-6)  # "1e-6" is a string to YAML; coerced
    assert cfg.output_dir == "runs/y"
    assert parse_overrides(["eval_data=synthetic:add1?split=heldout"]) == {"eval_data": "synthetic:add1?split=heldout"}


def test_all_bad_fields_reported_at_once(tmp_path):
    bad = dict(BASE, tau_p=1.5, tau_h_quantile=2, epsilon=-0.1, num_generations=1, learning_rate="fast",
               max_stepz=3, eval_samples=0, method="ppo")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, bad))
    errors = info.value.errors
    text = "\n".join(errors)
    for needle in ("tau_p: must be a number in [0, 1]", "tau_h_quantile: must be a number in [0, 1]",
                   "epsilon: must be a number >= 0, got -0.1",
                   "num_generations: (the group size) must be >= 2", "learning_rate: expected float",
                   "max_stepz: unknown field; did you mean 'max_steps'?", "eval_samples: must be >= 1",
                   "method: must be one of grpo, dapo"):
        assert needle in text, (needle, text)
    assert len(errors) == 8


@pytest.mark.parametrize(
    "content, needle",
    [
        ("model: [unclosed", "invalid YAML at line 1"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_bad_files(tmp_path, content, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, content))


def test_missing_file_lists_bundled_configs():
    with pytest.raises(ConfigError, match="no such file nope.yaml .*demo"):
        load_config("nope.yaml")


def test_cross_field_checks(tmp_path):
    # thresholds are accepted for every method (diagnostic for the methods that do not mask)
    assert load_config(write(tmp_path, dict(BASE, method="grpo", tau_p=0.02))).trl["tau_p"] == 0.02
    with pytest.raises(ConfigError, match="top_entropy_quantile: applies only to method '20-entropy'"):
        load_config(write(tmp_path, dict(BASE, method="grpo", top_entropy_quantile=0.3)))
    with pytest.raises(ConfigError, match="must be a multiple of num_generations"):
        load_config(write(tmp_path, dict(BASE, num_generations=3, per_device_train_batch_size=4)))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["method=dapo"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_flat_dict() == cfg.to_flat_dict()


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    p = write(tmp_path, dict(BASE, tau_p=5, max_stepz=1))
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "tau_p: must be a number in [0, 1]" in err and "did you mean 'max_steps'" in err
    assert "Traceback" not in err


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    assert main(["train", "demo", "--dry-run", "max_steps=2", "method=grpo"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["max_steps"] == 2 and out["method"] == "grpo" and out["model"] == "embedded"


def test_validation_does_not_load_models(tmp_path, monkeypatch):
    import stapo.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded during validation")

    monkeypatch.setattr(stapo.models, "load_model", boom)
    monkeypatch.setattr(stapo.models, "resolve_model", boom)
    validate(dict(BASE))
