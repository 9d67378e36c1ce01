"""The one chat encoding of the project (inference, tuning, training): through the tokenizer's
chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(
    tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """The conversation rendered by the tokenizer's chat template (it must have one)."""
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
    )


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of the conversation through the chat template: the one chat encoding of the
    project (inference, tuning, training). Rendering then tokenising without special tokens is
    what `apply_chat_template(tokenize=True)` does, without its return type, which changed
    between transformers versions (a list, then a `BatchEncoding`)."""
    text = chat_text(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: Any, text: str, raw: bool = False) -> list[int]:
    """Token ids of one user message: through the chat template when the tokenizer has one
    (and not `raw`), else the plain text."""
    if not raw and has_chat_template(tokenizer):
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer(text)["input_ids"])
