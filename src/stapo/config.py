"""The run config of `stapo train`: one flat YAML mapping, validated before anything heavy loads.

A config names what to train and how:

    model: embedded                 # 'embedded', a local directory or a hub id
    train_data: synthetic:add1?n=512&seed=0
    eval_data: synthetic:add1?n=64&split=heldout
    method: stapo                   # grpo | dapo | dr_grpo | 20-entropy | justrl | stapo
    tau_p: 0.002                    # S2T thresholds (stapo.core.S2TSettings; null = the preset's)
    output_dir: runs/demo
    max_steps: 40                   # ... and any other field of TRL's GRPOConfig

Keys are either the run fields below (`RunConfig`) or fields of `STAPOConfig` (TRL's `GRPOConfig`
plus `method`, `tau_p`, `tau_h`, `tau_h_quantile`, rollout capture, ...). Command-line overrides
use the same names: `stapo train demo.yaml max_steps=2 method=grpo tau_p=0.02`.

`load_config` reports every bad field at once (type, range, unknown key with a "did you mean"),
and imports TRL only to read its field list: no model, tokenizer or dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stapo.core import PRESETS, S2T_FIELDS, S2TSettings, s2t_field_error

BUNDLED_CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; `errors` holds one message per bad field."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = list(errors)
        self.source = source
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} problem(s):\n{lines}")


@dataclass
class RunConfig:
    """What `stapo train` needs besides TRL's own options. Plain data; see the module docstring."""

    model: str = "embedded"
    train_data: str = ""
    train_data_kwargs: dict = field(default_factory=dict)  # extra load_prompts / datasets.load_dataset args
    eval_data: str | None = None
    problem_key: str = "problem"
    answer_key: str = "answer"
    skip_invalid_rows: bool = False
    prompt_template: str = "boxed"
    system_prompt: str | None = None
    reward_timeout: float = 5.0
    reward_mode: str = "auto"  # answer extraction: "auto" (box, then fallbacks) or "boxed" (box required)
    eval_samples: int = 4
    eval_max_new_tokens: int | None = None  # default: max_completion_length
    eval_temperature: float = 1.0
    eval_top_p: float = 1.0
    eval_before: bool = True
    eval_after: bool = True
    eval_limit: int | None = None
    eval_every: int = 0  # also evaluate every N optimizer steps (0: only before/after; single process only)
    plots: bool = True
    # LoRA (peft.LoraConfig, passed to TRL as `peft_config`); the names are TRL's ModelConfig's.
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str | None = None  # None: peft's default for the architecture
    trl: dict[str, Any] = field(default_factory=dict)  # STAPOConfig fields (incl. method, tau_*, output_dir)

    @property
    def output_dir(self) -> str:
        return self.trl["output_dir"]

    @property
    def method(self) -> str:
        return self.trl.get("method", "stapo")

    # One line each, printed once at the start of a run (and by --dry-run): options that are accepted
    # but do nothing here. Not a field: config.yaml does not store it.
    notes: typing.ClassVar[tuple[str, ...]] = ()

    def to_flat_dict(self) -> dict[str, Any]:
        """The resolved config as one flat mapping (what `config.yaml` in the run directory holds)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "trl"}
        flat.update(self.trl)
        return flat


LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# The run fields: the names `RunConfig` holds itself; every other key of a run config is a STAPOConfig field.
RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig)) - {"trl"}

# Range rules: name -> (predicate, description), for the run fields and TRL's own fields. The fields
# STAPOConfig adds or restricts (the shared loss settings included) take their rules from it:
# `stapo.engines.trl.config.stapo_field_error`.
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "must be > 0"),
    "num_generations": (lambda v: v is None or v >= 2, "(the group size) must be >= 2"),
    "per_device_train_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "must be >= 1"),
    "max_steps": (lambda v: v == -1 or v >= 1, "must be >= 1 (or -1 to use num_train_epochs)"),
    "max_completion_length": (lambda v: v is None or v >= 1, "must be >= 1"),
    "max_prompt_length": (lambda v: v is None or v >= 1, "must be >= 1"),
    "temperature": (lambda v: v > 0, "must be > 0"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "logging_steps": (lambda v: v > 0, "must be > 0"),
    "save_steps": (lambda v: v > 0, "must be > 0"),
    "num_iterations": (lambda v: v >= 1, "must be >= 1"),
    "reward_timeout": (lambda v: v > 0, "must be > 0 seconds"),
    "reward_mode": (lambda v: v in ("auto", "boxed"), "must be 'auto' or 'boxed'"),
    "eval_samples": (lambda v: v >= 1, "must be >= 1"),
    "eval_max_new_tokens": (lambda v: v is None or v >= 1, "must be >= 1"),
    "eval_temperature": (lambda v: v > 0, "must be > 0"),
    "eval_top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "eval_limit": (lambda v: v is None or v >= 1, "must be >= 1"),
    "eval_every": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "lora_r": (lambda v: v >= 1, "(the LoRA rank) must be >= 1"),
    "lora_alpha": (lambda v: v > 0, "must be > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "method": (lambda v: v in PRESETS, f"must be one of {', '.join(PRESETS)}"),
    "model": (lambda v: bool(v.strip()), "must be 'embedded', a local directory or a hub id"),
    "train_data": (lambda v: bool(v.strip()),
                   "is required: a JSONL/Parquet path, a hub id, benchmark:<name> or synthetic:<task>"),
    "output_dir": (lambda v: bool(str(v).strip()), "must be a directory path"),
}

# Defaults of the TRL fields that matter for a first run on a CPU; everything else is TRL's default.
TRL_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/stapo",
    "method": "stapo",
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "report_to": [],
    "log_completions": False,
}


def stapo_config_fields() -> dict[str, dataclasses.Field]:
    """Fields of `STAPOConfig` (imports TRL, loads nothing)."""
    from stapo.engines.trl import STAPOConfig

    return {f.name: f for f in dataclasses.fields(STAPOConfig) if f.init}


def _type_ok(value: Any, annotation: Any) -> bool:
    """A shallow check of a YAML value against a dataclass annotation (strings of unions included)."""
    if annotation is Any or annotation is None:
        return True
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, {**vars(typing), "Any": Any}, {})  # our own annotations, not input
        except Exception:  # noqa: BLE001 - an annotation we cannot read: accept the value
            return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type):
        return isinstance(value, annotation) or issubclass(annotation, str) and isinstance(value, str)
    return True


def _describe(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return str(text).replace("typing.", "").replace("NoneType", "null").replace("None", "null")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["max_steps=2", "tau_p=0.02", "tau_h=null"]` -> typed values (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r} must look like key=value"], "command line")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def find_config(path: str | os.PathLike) -> Path:
    """A config path, or the name of a bundled config (`demo`, `paper/qwen3-1.7b-stapo`)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (BUNDLED_CONFIG_DIR / p, BUNDLED_CONFIG_DIR / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    bundled = sorted(
        str(c.relative_to(BUNDLED_CONFIG_DIR).with_suffix(""))
        for c in BUNDLED_CONFIG_DIR.rglob("*.yaml")
        if c.parent.name != "accelerate"
    )
    raise ConfigError([f"no such file {path!s} (bundled configs: {', '.join(bundled)})"], str(path))


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"cannot read: {err}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"invalid YAML{where}: {getattr(err, 'problem', err)}"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of field: value, got {type(data).__name__}"], str(path))
    return data


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Check every field of a flat config mapping; raise one `ConfigError` listing all problems."""
    trl_fields = stapo_config_fields()
    from stapo.engines.trl.config import FIELD_RULES, LOSS_SETTING_NAMES, stapo_field_error

    run_types = typing.get_type_hints(RunConfig)
    known = sorted(RUN_FIELDS | set(trl_fields))
    errors: list[str] = []
    values = {**TRL_DEFAULTS, **raw}
    for key, value in values.items():
        if not isinstance(key, str):
            errors.append(f"{key!r}: field names must be strings")
            continue
        if key in RUN_FIELDS:
            annotation = run_types[key]
        elif key in trl_fields:
            annotation = trl_fields[key].type
        else:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            errors.append(f"{key}: unknown field{hint}")
            continue
        if isinstance(value, str) and not _type_ok(value, annotation) and _type_ok(1.5, annotation):
            # PyYAML reads `1e-6` (no dot) as a string; accept numeric strings for float fields.
            try:
                value = values[key] = float(value)
            except ValueError:
                pass
        if key in S2T_FIELDS or key in LOSS_SETTING_NAMES:
            # the S2T thresholds (stapo.core.settings) and the loss settings every engine shares
            # (stapo.core.loss_settings): their rules hold their types too (an infinite clip bound included)
            problem = None if value is None else (
                s2t_field_error(key, value) if key in S2T_FIELDS else stapo_field_error(key, value))
            if problem:
                errors.append(f"{key}: {problem}, got {value!r}")
            continue
        if not _type_ok(value, annotation):
            errors.append(f"{key}: expected {_describe(annotation)}, got {type(value).__name__} {value!r}")
            continue
        if key in FIELD_RULES:  # STAPOConfig's own rule, so this file and STAPOConfig agree
            problem = None if value is None else stapo_field_error(key, value)
            if problem:
                errors.append(f"{key}: {problem}, got {value!r}")
            continue
        rule = _RULES.get(key)
        if rule is not None and value is not None:
            try:
                ok = rule[0](value)
            except TypeError:
                ok = False
            if not ok:
                errors.append(f"{key}: {rule[1]}, got {value!r}")
    if "train_data" not in values:  # a rule checks only fields that are present
        errors.append(f"train_data: {_RULES['train_data'][1]}")
    if not errors:
        errors.extend(_cross_checks(values))
    if errors:
        raise ConfigError(errors, source)
    run = RunConfig(**{k: v for k, v in values.items() if k in RUN_FIELDS})
    run.notes = tuple(ignored_option_notes(values))  # type: ignore[misc]  # per run; a ClassVar to stay out of the fields
    run.trl = {k: v for k, v in values.items() if k in trl_fields}
    # Record the thresholds the run uses (applied by stapo, measured by the other methods), so the
    # run's config.yaml says which S2T reading it had.
    s2t = resolve_s2t(values)
    recorded = {name: getattr(s2t, name) for name in S2T_FIELDS if name in trl_fields}
    if s2t.tau_h is not None:  # an absolute tau_h: the quantile settings do not apply (and would conflict)
        recorded.update(tau_h_quantile=None, tau_h_population=None, tau_h_max=None)
    run.trl.update(recorded)
    return run


def resolve_s2t(values: dict[str, Any]) -> S2TSettings:
    """The S2T settings of a validated config: its own values over its method preset's."""
    preset = PRESETS[values.get("method", "stapo")]
    return S2TSettings.resolve({k: values.get(k) for k in S2T_FIELDS}, base=preset.s2t_settings)


def _cross_checks(values: dict[str, Any]) -> list[str]:
    from stapo.engines.trl.config import top_entropy_quantile_error

    errors = []
    problem = top_entropy_quantile_error(values.get("method", "stapo"), values.get("top_entropy_quantile"))
    if problem:
        errors.append(f"top_entropy_quantile: {problem}")
    if values.get("tau_h") is not None and values.get("tau_h_quantile") is not None:
        errors.append("tau_h_quantile: set tau_h (an absolute threshold in nats) or tau_h_quantile, not both "
                      "(set the other to null)")
    # TRL: generation_batch_size defaults to per_device_train_batch_size x steps_per_generation
    # (= gradient_accumulation_steps) per process, and must hold whole groups.
    g = values.get("num_generations") or 8
    spg = values.get("steps_per_generation") or values.get("gradient_accumulation_steps", 1)
    gen_batch = values.get("generation_batch_size") or values.get("per_device_train_batch_size", 8) * spg
    if gen_batch % g != 0:
        errors.append(
            f"num_generations: the generation batch ({gen_batch} completions = per_device_train_batch_size x "
            f"gradient_accumulation_steps) must be a multiple of num_generations ({g})"
        )
    return errors


# report_to integration -> the importable packages that serve it (any one of them).
REPORT_TO_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "neptune": ("neptune",),
    "swanlab": ("swanlab",),
    "codecarbon": ("codecarbon",),
    "azure_ml": ("azureml",),
}
LOGGING_EXTRA = ("tensorboard", "wandb")  # what `pip install "stapo[logging]"` installs


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def missing_packages(values: dict[str, Any]) -> list[str]:
    """One error per option whose package is not importable (report_to loggers, use_vllm, use_peft):
    found here, before any model loads, instead of as a traceback from inside the Trainer."""
    errors = []
    report_to = values.get("report_to")
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        packages = REPORT_TO_PACKAGES.get(name)
        if packages is None or any(_installed(p) for p in packages):
            continue  # "all" / "none" / an integration transformers checks itself
        fix = 'pip install "stapo[logging]"' if name in LOGGING_EXTRA else f"pip install {packages[0]}"
        errors.append(f"report_to: {name!r} needs the {packages[0]} package, which is not installed; {fix} "
                      f"(or remove {name!r} from report_to)")
    if values.get("use_vllm") and not _installed("vllm"):
        errors.append("use_vllm: vLLM is not importable in this environment; it lives in its own venv "
                      "(scripts/setup.sh vllm, docs/eval.md \"vLLM on a CPU\"; "
                      "on a GPU: pip install 'vllm>=0.22,<0.32'), "
                      "or set use_vllm=false")
    if values.get("use_peft") and not _installed("peft"):
        errors.append('use_peft: LoRA needs the peft package, which is not installed; pip install "stapo[peft]" '
                      "(or set use_peft=false)")
    return errors


def check_packages(run: RunConfig) -> None:
    """`missing_packages` of a validated config as one `ConfigError`: `stapo train` (and --dry-run) calls
    it before anything loads. Not part of `load_config`: a config is valid on a machine without the
    loggers or vLLM it names (the paper configs are checked on CPU-only machines)."""
    errors = missing_packages(run.to_flat_dict())
    if errors:
        raise ConfigError(errors, "config")


def ignored_option_notes(values: dict[str, Any]) -> list[str]:
    """Notes on options that are accepted but have no effect with this config."""
    notes = []
    method = values.get("method", "stapo")
    s2t_set = [name for name in S2T_FIELDS if values.get(name) is not None]
    if not PRESETS[method].filter.applies_s2t and s2t_set:
        notes.append(f"{', '.join(s2t_set)} {'applies' if len(s2t_set) == 1 else 'apply'} only to method=stapo; "
                     f"here (method={method}) S2T is only measured (the stapo/s2t_* metrics), not applied")
    if not values.get("use_peft"):
        lora_set = [name for name in LORA_FIELDS if name in values]
        if lora_set:
            notes.append(f"{', '.join(lora_set)} {'applies' if len(lora_set) == 1 else 'apply'} only with "
                         "use_peft=true; this run trains all weights")
    return notes


def load_config(path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read, override and validate a run config. Raises `ConfigError` (all problems at once)."""
    cfg_path = find_config(path)
    raw = read_yaml(cfg_path)
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    raw.update(extra)
    try:
        return validate(raw, source=str(cfg_path))
    except ConfigError as err:
        raise ConfigError(err.errors, _blame(err.errors, str(cfg_path), overrides, extra)) from None


def _blame(errors: list[str], cfg_path: str, overrides, extra: dict[str, Any]) -> str:
    """Where the problems come from: `override max_steps=abc` for a field the command line set (as
    typed), the config file for the others."""
    typed = {item.partition("=")[0].strip(): item for item in overrides} if isinstance(overrides, list) else {}
    blamed, from_file = [], False
    for error in errors:
        key = error.partition(":")[0]
        if key in extra:
            text = typed.get(key, f"{key}={extra[key]}")
            if text not in blamed:
                blamed.append(text)
        else:
            from_file = True
    named = [f"override{'s' if len(blamed) > 1 else ''} {', '.join(blamed)}"] if blamed else []
    return " and ".join(([cfg_path] if from_file else []) + named)


def dump_config(run: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (round-trips through `load_config`)."""
    from stapo.rundir import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(run.to_flat_dict(), sort_keys=False))
