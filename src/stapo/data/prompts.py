"""Prompt formats: the paper's "reason step by step, answer in \\boxed{}" instruction.

    format_prompt(problem, tokenizer=None, template="boxed", system_prompt=None)

- ``tokenizer=None``: a conversational prompt, ``[{"role": "user", "content": ...}]`` (plus a
  system message when given). This is what TRL's ``GRPOTrainer`` takes in a dataset's
  ``"prompt"`` column; it applies the model's chat template itself.
- a tokenizer with a chat template: the rendered string, generation prompt included
  (``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``).
- a tokenizer without a chat template (a base model): the raw text, system prompt first.

``template`` is a name from :data:`PROMPT_TEMPLATES` or any string with a ``{problem}`` field.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROMPT_TEMPLATES", "build_messages", "format_prompt", "render_instruction"]

PROMPT_TEMPLATES: dict[str, str] = {
    # Qwen2.5-Math / DeepSeek-R1-style zero-RL instruction, the paper's setting.
    "boxed": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    # Shorter, for small models and short generation budgets (the demo).
    "boxed_short": "{problem}\nPut your final answer within \\boxed{{}}.",
    # DAPO-Math-17k's own instruction.
    "dapo": (
        "Solve the following math problem step by step. The last line of your response should be "
        "of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
        "problem.\n\n{problem}\n\nRemember to put your answer on its own line after \"Answer:\"."
    ),
    "plain": "{problem}",
}


def render_instruction(problem: str, template: str = "boxed") -> str:
    """The user message text: ``template`` (a name or a ``{problem}`` string) filled in."""
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("problem must be a non-empty string")
    text = PROMPT_TEMPLATES.get(template, template)
    if "{problem}" not in text:
        raise ValueError(
            f"template {template!r} is neither a known name ({', '.join(PROMPT_TEMPLATES)}) "
            "nor a string with a {problem} field"
        )
    # Substitute by splitting, not str.format: braces inside the problem are never interpreted.
    pieces = [p.replace("{{", "{").replace("}}", "}") for p in text.split("{problem}")]
    return problem.join(pieces)

def build_messages(problem: str, template: str = "boxed", system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversational prompt TRL expects: a list of ``{"role", "content"}`` messages."""
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": render_instruction(problem, template)})
    return messages


def format_prompt(
    problem: str,
    tokenizer: Any = None,
    template: str = "boxed",
    system_prompt: str | None = None,
) -> str | list[dict[str, str]]:
    """The prompt for ``problem``: messages (no tokenizer), the chat-templated string, or the
    raw string for a tokenizer without a chat template. See the module docstring."""
    messages = build_messages(problem, template, system_prompt)
    if tokenizer is None:
        return messages
    if getattr(tokenizer, "chat_template", None):
        templated: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return templated
    parts = [m["content"] for m in messages]
    return "\n\n".join(parts) + "\n"
