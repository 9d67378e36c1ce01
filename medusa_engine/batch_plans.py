"""Which tree and lookup branch to verify with at each batch size, measured on this machine.

A verification forward over B rows of N nodes costs more as B x N grows: on a CPU it turns
compute-bound at a few dozen tokens, so the tree that is best alone (many nodes, long lookup
branch) loses at batch 8, where a row's extra nodes are paid by every row. `tune_plans` runs the
scheduler at each batch size with each candidate (tree, lookup) on real prompts and keeps the
one with the highest aggregate tokens/s; `medusa-engine tune-tree --batch-sizes 1,2,4,8` writes
the result as JSON (`save_plans`), which `serve` and `bench --concurrency` read (`load_plans`):

    {"plans": {"1": {"tree": "<spec>", "lookup": 16}, "8": {"tree": "cpu_8", "lookup": 0}},
     "measured": {"1": {"<spec>|16": tokens/s, ...}, ...}}

Tree specs are anything `tree_spec.parse_tree` takes (presets, dynamic:N, paths inline).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attention.state_files import atomic_write
from medusa_engine.config import EngineConfig
from medusa_engine.drafters import Drafter
from medusa_engine.engine import heads_folder
from medusa_engine.generate import MedusaGenerator
from medusa_engine.models import resolve_model
from medusa_engine.scheduler import BatchPlan, Request, Scheduler, generate_all
from medusa_engine.tree_spec import parse_tree

Candidate = tuple[str, int]  # (tree spec, lookup)
BUNDLED = "batch_plans.json"  # beside the heads it was tuned for


def parse_sizes(value: str, flag: str) -> list[int]:
    """`1,2,4,8` -> [1, 2, 4, 8] (sorted, unique, each >= 1), or ValueError naming `flag`."""
    try:
        sizes = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{flag} takes integers like 1,2,4,8, not {value!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{flag} needs sizes >= 1, got {value!r}")
    return sizes


def load_plans(path: str | Path, drafter: Drafter | None) -> tuple[dict[int, BatchPlan], dict]:
    """The plans of a `save_plans` file, trees resolved for `drafter`; and the specs as written."""
    try:
        record = json.loads(Path(path).read_text())
        specs = {int(size): (str(p["tree"]), int(p["lookup"])) for size, p in record["plans"].items()}  # fmt: skip
    except FileNotFoundError:
        raise ValueError(f"batch plans {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"batch plans {path}: not a tune-tree --batch-sizes file ({err})"
        ) from None
    if not specs or min(specs) != 1 or any(lookup < 0 for _, lookup in specs.values()):
        raise ValueError(f"batch plans {path}: need a plan for batch size 1 and lookups >= 0")
    folder = Path(path).parent  # a tree file beside the plans is named relative to them
    plans = {
        size: BatchPlan(parse_tree(_beside(folder, tree), drafter), lookup)
        for size, (tree, lookup) in specs.items()
    }
    return plans, {size: {"tree": t, "lookup": lk} for size, (t, lk) in specs.items()}


def plans_for(
    config: EngineConfig, drafter: Drafter | None, path: str | Path | None = None
) -> dict[int, BatchPlan] | None:
    """`--batch-plans`: the file given, else the heads' bundled `batch_plans.json` if they ship
    one, else None (the engine's own tree and lookup at every batch size)."""
    if path is None:
        folder = heads_folder(config.heads, resolve_model(config.model))
        bundled = folder / BUNDLED if folder is not None else None
        path = bundled if bundled is not None and bundled.is_file() else None
    return load_plans(path, drafter)[0] if path is not None else None


def _beside(folder: Path, spec: str) -> str:
    return str(folder / spec) if (folder / spec).is_file() else spec


def save_plans(path: str | Path, chosen: dict[int, Candidate], measured: dict[int, dict]) -> None:
    """Write the chosen plans (a tree file in the same folder is named by its file name, so
    the folder can move) and every measured figure."""
    folder = Path(path).resolve().parent

    def spec(tree: str) -> str:
        file = Path(tree)
        return file.name if file.is_file() and file.resolve().parent == folder else tree

    record = {
        "plans": {str(b): {"tree": spec(t), "lookup": lk} for b, (t, lk) in sorted(chosen.items())},
        "measured": {
            str(b): {spec(k.rsplit("|", 1)[0]) + "|" + k.rsplit("|", 1)[1]: v for k, v in m.items()}
            for b, m in sorted(measured.items())
        },
    }
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def tune_plans(
    engine: MedusaGenerator,
    prompts: Sequence[Sequence[int]],
    sizes: Sequence[int],
    candidates: Sequence[Candidate],
    max_new_tokens: int = 48,
    progress: Callable[[str], None] = lambda message: None,
    rounds: int = 2,
) -> tuple[dict[int, Candidate], dict[int, dict[str, float]]]:
    """For each batch size B, the candidate with the highest aggregate tokens/s over 2B
    requests, B at a time (greedy, `max_new_tokens` each, the prompts cycled; the best of
    `rounds` runs, so that a burst of load elsewhere does not decide), and every figure."""
    if not prompts:
        raise ValueError("tuning needs prompts")
    chosen: dict[int, Candidate] = {}
    measured: dict[int, dict[str, float]] = {}
    own = (engine.tree, engine.lookup, engine.lookup_branch)  # the schedulers below switch them
    resolved = {c: BatchPlan(parse_tree(c[0], engine.drafter), c[1]) for c in candidates}
    for size in sorted(set(sizes)):
        measured[size] = {}
        requests = [
            Request(tuple(prompts[i % len(prompts)]), max_new_tokens) for i in range(2 * size)
        ]
        order = list(resolved.items())
        for round_ in range(rounds):  # the best of `rounds` runs, in alternating order
            for candidate, plan in order if round_ % 2 == 0 else order[::-1]:
                scheduler = Scheduler(engine, max_batch=size, plans={1: plan})
                generate_all(scheduler, requests[:size])  # warm-up: not measured
                start = time.perf_counter()
                results = generate_all(scheduler, requests)
                rate = sum(len(t) for t, _ in results) / (time.perf_counter() - start)
                key = f"{candidate[0]}|{candidate[1]}"
                measured[size][key] = round(max(rate, measured[size].get(key, 0.0)), 2)
                progress(
                    f"batch {size}: tree {candidate[0]} lookup {candidate[1]}: {rate:.1f} tok/s"
                )
        best = max(measured[size], key=lambda key: measured[size][key])
        tree, lookup = best.rsplit("|", 1)
        chosen[size] = (tree, int(lookup))
    engine.tree, engine.lookup, engine.lookup_branch = own
    return chosen, measured


def describe(plans: dict[int, Any]) -> str:
    return ", ".join(
        f"B>={b}: {p['tree']} + lookup {p['lookup']}" for b, p in sorted(plans.items())
    )
