"""Choose the tree for the hardware: maximise expected τ per unit of step latency.

Shape legend: T = calibration positions, K = heads, R = top-k ranks considered.

1. **Latency curve.** The engine's real verification step (heads, candidates, forward, acceptance,
   compaction) is timed for trees of n nodes over a cache of `cache_len` tokens, on the current
   device and dtype; sizes between measured points are interpolated. The timed trees are as deep
   as the heads allow (a recurrent drafter pays per depth), so small trees are not flattered.
2. **Acceptance.** Calibration prompts (hand-written, in no evaluation set) are continued greedily;
   one teacher-forced forward gives the last hidden state at every position t, and each head's
   top-R there (recurrent heads read the true tokens before depth k: `Drafter.path_topk`).
   `rank_TK[t, k]` = rank of the true token t + k + 2 in head k's top-R (R if absent).
   A node with path (r_0, ..., r_d) is accepted at t exactly when rank_TK[t, :d+1] == path, so its
   value (probability of acceptance) is the empirical frequency of that rank prefix: the joint
   frequency, not Medusa's product of per-head marginals.
3. **Tree.** Expected τ of a tree = 1 + Σ over nodes of value(node). A child's value never exceeds
   its parent's, so best-first expansion (as in Medusa's and Sequoia's searches) yields, for every
   n, the n-node tree of maximal expected τ; we keep the n maximising τ(n) / latency(n + 1).

Presets scored on the same measurements (`score_tree`) can only do as well or worse.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medusa_engine.atomic import atomic_write
from medusa_engine.generate import MedusaGenerator
from medusa_engine.hf_adapter import HFModel
from medusa_engine.models import ASSETS, cache_dir
from medusa_engine.tree import TreeBuffers, build_tree

log = logging.getLogger(__name__)

TreePath = tuple[int, ...]
LATENCY_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True)
class TunedTree:
    """A tuned tree and the measurements it was chosen from (saved as JSON)."""

    paths: list[list[int]]
    predicted_tau: float
    step_ms: float
    latency_ms: dict[int, float]  # tree nodes (incl. root) -> measured step latency
    calibration_positions: int
    key: str = ""

    @property
    def tokens_per_ms(self) -> float:
        return self.predicted_tau / self.step_ms

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1)))

    @classmethod
    def load(cls, path: Path) -> TunedTree:
        raw = json.loads(Path(path).read_text())
        raw["latency_ms"] = {int(k): float(v) for k, v in raw["latency_ms"].items()}
        return cls(**raw)


# ---- 1. latency ---------------------------------------------------------------------------------


def synthetic_tree(nodes: int, num_heads: int, top_k: int = 10) -> TreeBuffers:
    """A valid tree of exactly `nodes` nodes for timing: as deep as it can be (a chain of rank-0
    nodes first: a recurrent drafter pays per depth, and tuned trees are deep), then breadth-first.
    Apart from depth, the step latency depends on the size, not the shape."""
    chain = [(0,) * d for d in range(1, min(nodes - 1, num_heads) + 1)]
    paths: list[TreePath] = list(chain)
    frontier: list[TreePath] = [()]
    while len(paths) < nodes - 1 and frontier:
        parent = frontier.pop(0)
        for rank in range(top_k):
            if len(parent) >= num_heads or len(paths) >= nodes - 1:
                break
            child = (*parent, rank)
            if child not in chain:
                paths.append(child)
            frontier.append(child)
    return build_tree(paths, num_heads, top_k)


@torch.inference_mode()
def measure_latency(
    engine: MedusaGenerator,
    sizes: Sequence[int] = LATENCY_SIZES,
    cache_len: int = 256,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """Wall time (ms) of one engine step for trees of each size over a `cache_len` cache.

    Each size keeps the fastest of `repeats` runs (other load on the machine only ever adds
    time), and the curve is made non-decreasing in the size: verifying more nodes never costs
    less, and `choose_tree`'s optimality argument needs that.
    """
    model = engine.model
    heads = engine.drafter.num_heads if engine.drafter is not None else 0
    cache_len = min(cache_len, model.max_context - max(sizes) - 8)
    prompt = torch.randint(
        3, model.vocab_size, (cache_len,), generator=torch.Generator().manual_seed(0)
    )
    session = model.new_session()
    hidden_E, root = engine._prefill(prompt.tolist(), session)
    saved, saved_branch = engine.tree, engine.lookup_branch
    engine.lookup_branch = None  # the drafter's tree alone: a lookup branch comes only with a match
    latency: dict[int, float] = {}
    try:
        for size in sizes:
            if size > 1 and heads == 0:
                break
            engine.set_tree(synthetic_tree(size, max(heads, 1)))
            times = []
            for i in range(repeats + 1):
                start = time.perf_counter()
                engine._step(hidden_E, root, session)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first run is a warm-up
                    times.append(time.perf_counter() - start)
                model.keep(session, 0, None, cache_len)
                del session.token_ids[cache_len:]
            latency[size] = max(1000 * min(times), max(latency.values(), default=0.0))
            if progress:
                progress(f"step with {size:>3} nodes: {latency[size]:.2f} ms")
    finally:
        engine.set_tree(saved)
        engine.lookup_branch = saved_branch
    return latency


def interpolate(latency: dict[int, float], nodes: int) -> float:
    """Linear interpolation of the latency curve (clamped at the ends)."""
    sizes = sorted(latency)
    if nodes <= sizes[0]:
        return latency[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if nodes <= hi:
            w = (nodes - lo) / (hi - lo)
            return (1 - w) * latency[lo] + w * latency[hi]
    return latency[sizes[-1]] * nodes / sizes[-1]


# ---- 2. acceptance ------------------------------------------------------------------------------


def calibration_prompts(tokenizer, limit: int | None = None) -> list[list[int]]:
    """Token ids of the bundled calibration prompts (chat template when the tokenizer has one)."""
    rows = [json.loads(line) for line in (ASSETS / "calibration_prompts.jsonl").open()]
    templated = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in rows[:limit]:
        if templated and row["kind"] == "instruction":
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": row["text"]}],
                add_generation_prompt=True,
                tokenize=True,
            )
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        elif not templated and row["kind"] == "story":
            out.append(list(tokenizer(row["text"])["input_ids"]))
    return out


@torch.inference_mode()
def head_ranks(
    engine: MedusaGenerator, prompts: Sequence[Sequence[int]], new_tokens: int, top_k: int
) -> torch.Tensor:
    """rank_TK: rank of the true token t + k + 2 in head k's top-k at position t (top_k if absent).

    The "true" continuation is the base model's own greedy output, as the engine would emit.
    """
    if engine.drafter is None:
        raise ValueError("tuning a tree needs heads")
    model, k_heads = engine.model, engine.drafter.num_heads
    plain = MedusaGenerator(model, None, "plain")
    ranks = []
    for ids in prompts:
        out = plain.generate(ids, new_tokens).token_ids
        seq = list(ids) + out
        session = model.new_session()
        hidden_TE = model.forward(torch.tensor(seq, device=model.device),
                                  torch.arange(len(seq), device=model.device), session)  # fmt: skip
        first, last = len(ids) - 1, len(seq) - k_heads - 2  # positions with K true future tokens
        if last < first:
            continue
        for t in range(first, last + 1):
            path_K = seq[t + 1 : t + 1 + k_heads]  # the root, then the true tokens
            top_KR = engine.drafter.path_topk(hidden_TE[t], path_K, seq[: t + 1], top_k)
            truth_K = torch.tensor(seq[t + 2 : t + 2 + k_heads], device=top_KR.device)
            hit_KR = top_KR == truth_K[:, None]
            rank_K = torch.where(hit_KR.any(-1), hit_KR.int().argmax(-1), top_k)
            ranks.append(rank_K.cpu())
    if not ranks:
        raise ValueError("calibration produced no positions: give longer continuations")
    return torch.stack(ranks)


def node_values(rank_TK: torch.Tensor, top_k: int) -> Callable[[TreePath], float]:
    """value(path) = fraction of positions whose rank prefix equals `path` (joint frequency).

    Ranks >= top_k were not observed (rank_TK uses top_k for "absent"): their value is 0.
    """
    total = rank_TK.shape[0]
    counts: Counter[TreePath] = Counter()
    for row in rank_TK.tolist():
        for d in range(len(row)):
            counts[tuple(row[: d + 1])] += 1
    return lambda path: 0.0 if max(path) >= top_k else counts.get(tuple(path), 0) / total


# ---- 3. tree --------------------------------------------------------------------------------------


def best_first(
    value: Callable[[TreePath], float], num_heads: int, top_k: int, max_nodes: int
) -> list[tuple[TreePath, float]]:
    """The nodes of maximal value, best first; every prefix of the list is a valid tree."""
    heap: list[tuple[float, int, TreePath]] = []
    order = 0

    def push(path: TreePath) -> None:
        nonlocal order
        v = value(path)
        if v > 0:
            heapq.heappush(heap, (-v, order, path))
            order += 1

    for r in range(top_k):
        push((r,))
    chosen: list[tuple[TreePath, float]] = []
    while heap and len(chosen) < max_nodes - 1:
        neg, _, path = heapq.heappop(heap)
        chosen.append((path, -neg))
        if len(path) < num_heads:
            for r in range(top_k):
                push((*path, r))
    return chosen


def score_tree(
    paths: Sequence[Sequence[int]], value: Callable[[TreePath], float], latency: dict[int, float]
) -> tuple[float, float]:
    """(expected τ, predicted step ms) of a tree under the same measurements."""
    tau = 1.0 + sum(value(tuple(p)) for p in paths)
    return tau, interpolate(latency, len(paths) + 1)


def choose_tree(
    value: Callable[[TreePath], float], latency: dict[int, float], num_heads: int, top_k: int
) -> tuple[list[TreePath], float, float]:
    """The best-first prefix maximising τ / latency: (paths, τ, step ms)."""
    max_nodes = max(latency)
    ranked = best_first(value, num_heads, top_k, max_nodes)
    best: tuple[list[TreePath], float, float] = ([], 1.0, latency[min(latency)])
    tau = 1.0
    for n, (_, v) in enumerate(ranked, start=1):
        tau += v
        ms = interpolate(latency, n + 1)
        if tau / ms > best[1] / best[2]:
            best = ([p for p, _ in ranked[:n]], tau, ms)
    return best


def tune(
    engine: MedusaGenerator,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    new_tokens: int = 64,
    top_k: int = 10,
    sizes: Sequence[int] = LATENCY_SIZES,
    progress: Callable[[str], None] | None = None,
) -> tuple[TunedTree, Callable[[TreePath], float]]:
    """Measure, estimate and choose; returns the tuned tree and the value function used."""
    if engine.drafter is None:
        raise ValueError("tuning a tree needs heads (--heads)")
    prompts = prompts if prompts is not None else calibration_prompts(engine.model.tokenizer)
    if progress:
        progress(f"measuring step latency for trees of {min(sizes)}..{max(sizes)} nodes")
    latency = measure_latency(engine, sizes, progress=progress)
    if progress:
        progress(f"estimating head acceptance on {len(prompts)} calibration prompts")
    ranks = head_ranks(engine, prompts, new_tokens, top_k)
    value = node_values(ranks, top_k)
    paths, tau, ms = choose_tree(value, latency, engine.drafter.num_heads, top_k)
    tuned = TunedTree([list(p) for p in paths], tau, ms, latency, int(ranks.shape[0]))
    return tuned, value


def cache_key(model: HFModel, heads_dir: Path | None) -> str:
    """Model + heads (content) + device + dtype + threads: what the tuned tree depends on."""
    h = hashlib.sha256()
    h.update(f"{model.name}|{model.device}|{model.dtype}|{torch.get_num_threads()}".encode())
    if heads_dir is not None:
        for f in sorted(Path(heads_dir).glob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".pt", ".json"):
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def auto_tree(
    engine: MedusaGenerator, heads_dir: Path | None, progress: Callable[[str], None]
) -> TunedTree:
    """The cached tuned tree for this model + heads + device + dtype, tuning on first use."""
    key = cache_key(engine.model, heads_dir)
    path = cache_dir() / "trees" / f"{key}.json"
    if path.is_file():
        return TunedTree.load(path)
    progress(f"tuning the tree for this model, heads and device (once; cached at {path})")
    tuned, _ = tune(engine, progress=progress)
    tuned = TunedTree(**{**asdict(tuned), "key": key})
    tuned.save(path)
    return tuned
