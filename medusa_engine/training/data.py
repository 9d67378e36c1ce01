"""Training data for draft heads: records from files or the hub -> token ids + loss masks.

Records are read through `datasets` (local json/jsonl/txt/parquet, or a hub dataset name for users
who are online) and come in three kinds, detected from their columns:

* `alpaca`: `instruction` (+ optional `input`) and `output`;
* `sharegpt`: `conversations`, a list of `{"from": human|gpt|system, "value": ...}` turns (or
  `{"role", "content"}` messages);
* `text`: a `text` column. A `.txt` file is split into documents on `<|endoftext|>` (TinyStories)
  or, without that separator, on blank lines.

`Example.ids` is the token sequence; `Example.start` is the first position whose token is a
training target (the response, after the prompt; 1 for plain text; for multi-turn ShareGPT records
everything after the first prompt, later user turns included). Chat records go through the
project's one chat encoding (`hf_adapter.encode_chat`) when the tokenizer has a chat template.
The held-out split is fixed: the last `eval_fraction` of examples in file order (never shuffled),
so metrics are comparable between runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medusa_engine.hf_adapter import encode_chat, has_chat_template

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
FORMATS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bard": "assistant",
}


class TrainDataError(ValueError):
    """Data that cannot be read or understood; one line for the CLI."""


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and the first target position (loss on ids[start:])."""

    ids: list[int]
    start: int
    record: int = -1  # index of the record (prompt) it came from


def load_records(data: str, split: str = "train") -> Any:
    """A `datasets.Dataset` of raw records from a local file or a hub dataset name."""
    import datasets

    path = Path(data).expanduser()
    if path.is_file():
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise TrainDataError(
                f"unknown data format {path.suffix or '(no suffix)'!r} for {path}; "
                f"use one of {', '.join(FORMATS)} or a hub dataset name"
            )
        if fmt == "text":
            return datasets.Dataset.from_dict({"text": split_text(path.read_text("utf-8"))})
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for a malformed file
            raise TrainDataError(f"cannot read {path} as {fmt}: {err}") from None
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path))
    looks_local = data.startswith((".", "/", "~")) or path.suffix.lower() in FORMATS
    if looks_local or path.is_dir() or data.count("/") > 1:
        raise TrainDataError(f"data file not found: {data}")
    try:
        return datasets.load_dataset(data, split=split)
    except Exception as err:
        raise TrainDataError(f"cannot load hub dataset {data!r} (split {split}): {err}") from None


def split_text(text: str) -> list[str]:
    """Documents of a plain-text file: split on `<|endoftext|>`, else on blank lines."""
    parts = text.split(EOT) if EOT in text else text.split("\n\n")
    return [p.strip() for p in parts if p.strip()]


def record_kind(columns: list[str]) -> str:
    """'alpaca', 'sharegpt' or 'text' from a dataset's column names."""
    cols = set(columns)
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "conversations" in cols:
        return "sharegpt"
    if "text" in cols:
        return "text"
    raise TrainDataError(
        f"unknown record format (columns {sorted(cols)}): expected instruction/input/output "
        "(Alpaca), conversations (ShareGPT) or text"
    )


def to_messages(record: dict, kind: str) -> list[dict[str, str]]:
    """Chat messages of an instruction record (the last one is the reference answer, if any)."""
    if kind == "alpaca":
        prompt = record["instruction"].strip()
        if (record.get("input") or "").strip():
            prompt += "\n\n" + record["input"].strip()
        msgs = [{"role": "user", "content": prompt}]
        return msgs + [{"role": "assistant", "content": record.get("output") or ""}]
    msgs = []
    for turn in record["conversations"]:
        role = turn.get("from", turn.get("role", ""))
        if role not in ROLES:
            raise TrainDataError(f"unknown ShareGPT speaker {role!r}")
        msgs.append({"role": ROLES[role], "content": turn.get("value", turn.get("content", ""))})
    return msgs


def prompt_messages(record: dict, kind: str) -> list[dict[str, str]]:
    """The messages up to (not including) the first assistant turn: what a model answers."""
    msgs = to_messages(record, kind)
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    if not any(m["role"] == "user" for m in msgs[:first]):
        raise TrainDataError("a record has no user turn before the first answer")
    return msgs[:first]


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt, ready for the assistant's answer (chat template if there is one)."""
    if has_chat_template(tokenizer):
        return encode_chat(tokenizer, messages, add_generation_prompt=True)
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return list(tokenizer(text)["input_ids"])


def encode_record(tokenizer: Any, record: dict, kind: str, max_length: int) -> Example | None:
    """Tokenise one record; None when nothing trainable is left (too short after truncation)."""
    if kind == "text":
        ids = list(tokenizer(record["text"])["input_ids"])[:max_length]
        start = 1
    else:
        msgs = to_messages(record, kind)
        prompt = prompt_messages(record, kind)
        start = len(prompt_ids(tokenizer, prompt))
        if has_chat_template(tokenizer):
            ids = encode_chat(tokenizer, msgs, add_generation_prompt=False)
        else:
            rest = "\n\n".join(m["content"] for m in msgs[len(prompt) :])
            ids = prompt_ids(tokenizer, prompt) + list(
                tokenizer(rest, add_special_tokens=False)["input_ids"]
            )
        ids = ids[:max_length]
    # Head k at position t predicts ids[t + k + 2]: at least 3 tokens give head 0 one target.
    return Example(ids, start) if len(ids) - max(start, 2) >= 1 else None


def encode_dataset(tokenizer: Any, records: Any, max_length: int) -> list[Example]:
    """All trainable examples, in record order (self-distilled records carry their own ids)."""
    if "input_ids" in records.column_names and "prompt_len" in records.column_names:
        return [
            Example(list(r["input_ids"])[:max_length], int(r["prompt_len"]), int(r["prompt_index"]))
            for r in records
            if min(len(r["input_ids"]), max_length) - max(int(r["prompt_len"]), 2) >= 1
        ]
    kind = record_kind(records.column_names)
    out = [encode_record(tokenizer, r, kind, max_length) for r in records]
    examples = [Example(e.ids, e.start, i) for i, e in enumerate(out) if e is not None]
    if not examples:
        raise TrainDataError(f"no trainable examples (max length {max_length}, kind {kind})")
    log.info("%d %s examples (%d skipped)", len(examples), kind, len(out) - len(examples))
    return examples


def split_eval(
    examples: list[Example], eval_fraction: float
) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the held-out set is the last `eval_fraction` of the examples."""
    if not 0 <= eval_fraction < 1:
        raise TrainDataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    n_eval = round(len(examples) * eval_fraction)
    if eval_fraction > 0:
        n_eval = max(n_eval, 1)
    if n_eval >= len(examples):
        raise TrainDataError(f"{len(examples)} examples are too few to hold out {eval_fraction}")
    return examples[: len(examples) - n_eval], examples[len(examples) - n_eval :]
