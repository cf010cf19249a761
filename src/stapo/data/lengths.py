"""Prompt lengths in tokens against the model's context, checked before the model's weights load.

    prompt_token_limit(context, max_new_tokens, max_prompt_length=None) -> (limit, why)
    long_prompts(located_problems, tokenizer, limit, template, system_prompt) -> [(index, where, tokens, exact)]
    fit_training_prompts(run, args, model_path, tokenizer, train_rows, eval_rows, log)   (`stapo train`)
    check_eval_prompts(model, problems, template, max_new_tokens)                       (`stapo eval`)

A prompt and its longest completion must fit the model's context (``max_position_embeddings`` in
its config.json), so a prompt may have at most ``context - max_new_tokens`` tokens, and no more
than ``max_prompt_length`` when the config sets one. Without this check a 5 MB prompt loads the
model and then asks for tens of GB in the first forward pass. The tokenizer and config.json are
cheap to load; the weights are not. Policy (docs/data.md): refuse, naming the row; in training,
``skip_invalid_rows: true`` skips such rows instead and prints how many.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from stapo.data.loaders import DataError, PromptRows
from stapo.data.prompts import format_prompt

__all__ = ["check_eval_prompts", "fit_training_prompts", "long_prompts", "prompt_token_limit"]

# prompts tokenized per call: bounds the memory of the token lists held at once
_TOKENIZE_BATCH = 256


def prompt_token_limit(
    context: int | None,
    max_new_tokens: int | None,
    max_prompt_length: int | None = None,
    new_tokens_name: str = "max_completion_length",
) -> tuple[int | None, str]:
    """The most tokens a prompt may have and why (for messages); ``(None, "")`` when nothing
    limits it. Raises DataError when the completion budget alone fills the context."""
    limits: list[tuple[int, str]] = []
    if max_prompt_length is not None:
        limits.append((int(max_prompt_length), f"max_prompt_length {max_prompt_length}"))
    if context is not None:
        room = context - (max_new_tokens or 0)
        if room < 1:
            raise DataError(
                f"{new_tokens_name} {max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{context} tokens (max_position_embeddings); lower {new_tokens_name}"
            )
        why = f"the model's context {context} (max_position_embeddings)"
        if max_new_tokens:
            why += f" minus {new_tokens_name} {max_new_tokens}"
        limits.append((room, why))
    return min(limits) if limits else (None, "")


def _max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters: no token covers more characters of text (a
    byte-level entry has one character per byte; special tokens are literal text)."""
    return max((len(k) for k in tokenizer.get_vocab()), default=1) or 1


def long_prompts(
    located_problems: Iterable[tuple[str, str]],
    tokenizer: Any,
    limit: int | None,
    template: str = "boxed",
    system_prompt: str | None = None,
) -> list[tuple[int, str, int, bool]]:
    """``(index, where, tokens, exact)`` of every ``(where, problem)`` whose prompt, rendered as the
    engines build it (``format_prompt``: the chat template when the tokenizer has one; special
    tokens from the template only, as TRL does), has more than ``limit`` tokens.

    Only prompts that could be on either side of the limit are tokenized: one of at most
    ``limit - 16`` UTF-8 bytes fits (a token covers at least one byte; 16 spare for tokens that
    cover none, such as a SentencePiece word-start marker), and one of more than
    ``(limit + 1) * longest vocabulary entry`` characters cannot fit (``exact`` is then False and
    ``tokens`` that lower bound): a 5 MB prompt is refused without a 5 MB tokenizer pass.
    """
    items = list(located_problems)
    if limit is None or not items:
        return []
    longest = _max_token_chars(tokenizer)
    found: list[tuple[int, str, int, bool]] = []
    pending: list[tuple[int, str, str]] = []

    def count(batch: list[tuple[int, str, str]]) -> None:
        ids = tokenizer([text for _, _, text in batch], add_special_tokens=False)["input_ids"]
        found.extend((i, where, len(t), True) for (i, where, _), t in zip(batch, ids) if len(t) > limit)

    for i, (where, problem) in enumerate(items):
        text = cast(str, format_prompt(problem, tokenizer, template, system_prompt))  # a tokenizer: a string
        if len(text) <= limit - 16 and len(text.encode("utf-8")) <= limit - 16:
            continue
        if len(text) > (limit + 1) * longest:
            found.append((i, where, -(-len(text) // longest), False))
            continue
        pending.append((i, where, text))
        if len(pending) == _TOKENIZE_BATCH:
            count(pending)
            pending = []
    if pending:
        count(pending)
    return sorted(found)


def _too_long(where: str, tokens: int, limit: int, why: str, exact: bool = True) -> str:
    size = f"{tokens:,} tokens" if exact else f"at least {tokens:,} tokens (counted from its length in characters)"
    return f"{where}: prompt is {size}, over the limit of {limit:,} ({why})"


def _fit(rows: list[dict[str, Any]], name: str, tokenizer: Any, limit: int | None, why: str, run: Any,
         log: Callable[[str], None]) -> list[dict[str, Any]]:
    if limit is None:  # no context length known: nothing to check (long_prompts finds nothing)
        return rows
    locate = rows.location if isinstance(rows, PromptRows) else (lambda i: f"{name}: row {i + 1}")
    located = [(locate(i), r["problem"]) for i, r in enumerate(rows)]
    bad = long_prompts(located, tokenizer, limit, run.prompt_template, run.system_prompt)
    if not bad:
        return rows
    first = _too_long(*bad[0][1:3], limit, why, bad[0][3])
    if not run.skip_invalid_rows:
        more = f" ({len(bad) - 1} more row(s) too long)" if len(bad) > 1 else ""
        raise DataError(f"{first}{more}; shorten it, or set skip_invalid_rows: true to skip such rows")
    if len(bad) == len(rows):
        raise DataError(f"{name}: every prompt is over the limit of {limit:,} tokens (first: {first})")
    dropped = {b[0] for b in bad}
    kept = [i for i in range(len(rows)) if i not in dropped]
    log(f"stapo: skipped {len(bad)} row(s) of {name} whose prompt is over {limit:,} tokens (first: {first})")
    out = PromptRows([rows[i] for i in kept], source=name, locations=[locate(i) for i in kept])
    out.skipped = [(i + 1, _too_long(w, n, limit, why, exact)) for i, w, n, exact in bad]
    return out


def fit_training_prompts(run: Any, args: Any, model_path: str, tokenizer: Any, train_rows: list[dict[str, Any]],
                         eval_rows: list[dict[str, Any]] | None, log: Callable[[str], None] = print,
                         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """`stapo train`: the train (and eval) rows whose prompts fit the model's context with room for
    ``max_completion_length`` (``eval_max_new_tokens`` for eval rows), checked before the weights
    load. A longer prompt is a DataError naming its row, or with ``skip_invalid_rows`` is dropped
    and counted in one printed line."""
    from stapo.models import model_context_length

    context = model_context_length(model_path)
    max_prompt = getattr(args, "max_prompt_length", None)  # a GRPOConfig field in some TRL versions
    limit, why = prompt_token_limit(context, args.max_completion_length, max_prompt)
    train_rows = _fit(train_rows, run.train_data, tokenizer, limit, why, run, log)
    if eval_rows:
        eval_tokens = run.eval_max_new_tokens or args.max_completion_length
        name = "eval_max_new_tokens" if run.eval_max_new_tokens else "max_completion_length"
        limit, why = prompt_token_limit(context, eval_tokens, max_prompt, name)
        eval_rows = _fit(eval_rows, run.eval_data, tokenizer, limit, why, run, log)
    return train_rows, eval_rows


def check_eval_prompts(model: str, problems: Mapping[str, Sequence[Any]], template: str, max_new_tokens: int) -> None:
    """`stapo eval`: a DataError naming the first benchmark problem (``.id``, ``.problem``) whose
    prompt does not fit the model's context with room for ``max_new_tokens``. Loads the tokenizer
    and config.json only. No skipping: a benchmark with problems left out is another benchmark."""
    from stapo.models import load_tokenizer, model_context_length

    limit, why = prompt_token_limit(model_context_length(model), max_new_tokens, None, "--max-new-tokens")
    if limit is None:
        return
    tokenizer = load_tokenizer(model)
    for bench, rows in problems.items():
        bad = long_prompts([(f"{bench}: problem {p.id!r}", p.problem) for p in rows], tokenizer, limit, template)
        if bad:
            more = f" ({len(bad) - 1} more problem(s) too long)" if len(bad) > 1 else ""
            raise DataError(_too_long(*bad[0][1:3], limit, why, bad[0][3]) + more + "; lower --max-new-tokens or use a "
                            "model with a longer context")
