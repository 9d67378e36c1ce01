"""Evaluation prompts: the bundled MT-Bench / Spec-Bench question files, or any jsonl file.

A file holds one JSON object per line (blank lines skipped). A row's text is its first turn
(`turns[0]`), else its `prompt`, else its `text` field; its id is `question_id` (else `id`, else
the row index); its category is `category`, else "default".

Spec-Bench keeps MT-Bench's 80 questions with their MT-Bench categories (writing, roleplay, ...);
Spec-Bench itself reports them as one task, so the `spec_bench` set maps them to "mt_bench" and has
Spec-Bench's six categories: mt_bench, translation, summarization, qa, math_reasoning, rag.

`--limit N` takes N prompts round-robin over categories, in file order within each category, so a
small run still covers every category (the first N rows of Spec-Bench are all MT-Bench).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
PROMPT_SETS = {
    "mt_bench": DATA / "mt_bench" / "question.jsonl",
    "spec_bench": DATA / "spec_bench" / "question.jsonl",
}
SPEC_BENCH_TASKS = frozenset({"translation", "summarization", "qa", "math_reasoning", "rag"})
DEFAULT_CATEGORY = "default"


class PromptsError(ValueError):
    """A prompt file that cannot be used; one line for the CLI."""


@dataclass(frozen=True)
class Prompt:
    question_id: int | str
    category: str
    text: str


def load_prompts(source: str, limit: int | None = None) -> list[Prompt]:
    """Prompts of a named set (`mt_bench`, `spec_bench`) or a jsonl file, `limit` as above."""
    path = PROMPT_SETS.get(source, Path(source))
    if not path.is_file():
        raise PromptsError(
            f"no prompt set or file {source!r}; sets: {', '.join(PROMPT_SETS)}, or a .jsonl file"
        )
    prompts = [_prompt(row, i, path) for i, row in enumerate(_read_jsonl(path))]
    if not prompts:
        raise PromptsError(f"{path} holds no prompts")
    if source == "spec_bench":
        prompts = [
            p if p.category in SPEC_BENCH_TASKS else Prompt(p.question_id, "mt_bench", p.text)
            for p in prompts
        ]
    return take_round_robin(prompts, limit)


def take_round_robin(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """The first `limit` prompts dealt one per category in turn (categories in order of first
    appearance, file order within a category); all prompts, in file order, when limit is None."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 0:
        raise PromptsError(f"--limit must be >= 0, got {limit}")
    queues: dict[str, list[Prompt]] = {}
    for p in prompts:
        queues.setdefault(p.category, []).append(p)
    chosen: list[Prompt] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues.values():
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return chosen


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a jsonl file; `PromptsError` naming the line for anything that is not one JSON
    object per line."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PromptsError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptsError(f"{path}, line {number}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise PromptsError(f"{path}, line {number}: a row must be a JSON object")
        rows.append(row)
    return rows


def _prompt(row: dict, index: int, path: Path) -> Prompt:
    turns = row.get("turns")
    if turns:
        if not isinstance(turns, list) or not isinstance(turns[0], str):
            raise PromptsError(f"{path}: row {index}'s `turns` must be a list of strings")
        text = turns[0]
    elif row.get("prompt"):
        text = row["prompt"]
    elif row.get("text"):
        text = row["text"]
    else:
        raise PromptsError(f"{path}: row {index} has no `turns`, `prompt` or `text` field")
    qid = row.get("question_id")
    if qid is None:
        qid = row.get("id")
    return Prompt(
        question_id=index if qid is None else qid,
        category=str(row.get("category") or DEFAULT_CATEGORY),
        text=str(text),
    )
