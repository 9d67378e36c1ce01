"""Choose the tree for the hardware: maximise τ per unit of step latency.

Shape legend: T = calibration positions, K = heads, R = top-k ranks considered.

1. **Latency curve.** The engine's real verification step (heads, candidates, forward, acceptance,
   compaction) is timed for trees of n nodes over a cache of `cache_len` tokens, on the current
   device and dtype; sizes between measured points are interpolated. The timed trees are as deep
   as the heads allow (a recurrent drafter pays per depth), so small trees are not flattered.
2. **Acceptance.** Calibration prompts (hand-written, in no evaluation set) are continued greedily;
   one teacher-forced forward gives the last hidden state at every position t, and each head's
   top-R there (recurrent heads read the true tokens before depth k: `Drafter.path_topk`).
   `rank_TK[t, k]` = rank of the true token t + k + 2 in head k's top-R (R if absent).
   A node with path (r_0, ..., r_d) is accepted at t exactly when rank_TK[t, :d+1] == path, so a
   tree accepts a(t) = the length of the longest rank prefix of row t among its paths.
3. **τ along the engine's path** (`walk_tau`). Generation does not visit every position: a step
   at t emits a(t) + 1 tokens and the next one starts at t + a(t) + 1. Walking each calibration
   text that way gives the τ the engine would see on it (for greedy decoding, exactly: tested);
   the mean of 1 + a(t) over all positions over-weights the easy stretches a long accept skips.
4. **Tree.** A node's value (`node_values`) is the frequency of its rank prefix: the joint
   frequency, not Medusa's product of per-head marginals. A child's value never exceeds its
   parent's, so best-first expansion (as in Medusa's and Sequoia's searches) yields, for every n,
   the n-node tree that accepts the most tokens per position. Those trees and the presets are
   scored by their walk τ, and the one with the best τ(n) / latency(n + 1) is kept: presets
   scored on the same measurements (`score_tree`) can only do as well or worse.
5. **Dynamic trees** (`dynamic:N`, `dynamic_tree.py`): at each calibration position the drafter
   grows its N-node tree from the true root, and the deepest node whose path equals the true
   continuation is a(t); then the same walk. Their step is timed in alternation with the static
   tree of the same size (their drafting costs more). The dynamic size with the best τ / latency
   replaces the static tree when its ratio is higher.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from medusa_engine.atomic import atomic_write
from medusa_engine.candidates import path_tokens
from medusa_engine.dynamic_tree import DynamicTree
from medusa_engine.generate import MedusaGenerator
from medusa_engine.hf_adapter import HFModel
from medusa_engine.models import ASSETS, cache_dir
from medusa_engine.tree import TreeBuffers, build_tree
from medusa_engine.trees import TREE_PRESETS

log = logging.getLogger(__name__)

TreePath = tuple[int, ...]
LATENCY_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
DYNAMIC_MIN_NODES = 4  # smaller dynamic trees are static trees in all but cost


@dataclass(frozen=True)
class TunedTree:
    """A tuned tree and the measurements it was chosen from (saved as JSON)."""

    paths: list[list[int]]  # the best static tree
    predicted_tau: float  # walk τ of the chosen tree (static, or dynamic when dynamic_nodes > 0)
    step_ms: float
    latency_ms: dict[int, float]  # tree nodes (incl. root) -> measured step latency
    calibration_positions: int
    key: str = ""
    dynamic_nodes: int = 0  # > 0: `dynamic:<dynamic_nodes>` won
    dynamic_tau: dict[int, float] = field(default_factory=dict)  # nodes -> walk τ
    dynamic_latency_ms: dict[int, float] = field(default_factory=dict)

    @property
    def tokens_per_ms(self) -> float:
        return self.predicted_tau / self.step_ms

    @property
    def tree(self) -> list[list[int]] | str:
        """What `MedusaGenerator.set_tree` takes: the static paths or `dynamic:N`."""
        return f"dynamic:{self.dynamic_nodes}" if self.dynamic_nodes else self.paths

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1)))

    @classmethod
    def load(cls, path: Path) -> TunedTree:
        raw = json.loads(Path(path).read_text())
        for name in ("latency_ms", "dynamic_tau", "dynamic_latency_ms"):
            raw[name] = {int(k): float(v) for k, v in raw.get(name, {}).items()}
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
    dynamic_sizes: Sequence[int] = (),
) -> tuple[dict[int, float], dict[int, float]]:
    """Wall time (ms) of one engine step over a `cache_len` cache: (static trees of each of
    `sizes`, `dynamic:<n>` trees of each of `dynamic_sizes`, whose drafting costs more).

    Each size keeps the fastest of `repeats` runs: other load on the machine only ever adds time.
    The two kinds of a size are timed in alternation, one run of each in turn, so that the
    machine's speed drifting during tuning (we saw a whole curve move by 10 % between two series)
    weighs on both alike. A size that measured slower than a larger one of its kind was disturbed:
    it is timed again (`latency_curve`) before the curve is made non-decreasing.
    """
    model = engine.model
    heads = engine.drafter.num_heads if engine.drafter is not None else 0
    sizes = [s for s in sizes if s == 1 or heads > 0]
    dynamic_sizes = [s for s in dynamic_sizes if heads > 0]
    cache_len = min(cache_len, model.max_context - max([*sizes, *dynamic_sizes]) - 8)
    prompt = torch.randint(
        3, model.vocab_size, (cache_len,), generator=torch.Generator().manual_seed(0)
    )
    session = model.new_session()
    hidden_E, root = engine._prefill(prompt.tolist(), session)
    saved, saved_branch = engine.tree, engine.lookup_branch
    engine.lookup_branch = None  # the drafter's tree alone: a lookup branch comes only with a match

    def resolved(tree: TreeBuffers | DynamicTree) -> TreeBuffers | DynamicTree:
        engine.set_tree(tree)  # on the device / for these heads, once (not in the timed runs)
        return engine.tree

    trees: dict[tuple[str, int], TreeBuffers | DynamicTree] = {
        **{("static", n): resolved(synthetic_tree(n, max(heads, 1))) for n in sizes},
        **{("dynamic", n): resolved(DynamicTree(n)) for n in dynamic_sizes},
    }

    def fastest(keys: Sequence[tuple[str, int]], runs: int) -> list[float]:
        """Fastest of `runs` steps (after a warm-up) for each tree, the trees taking turns."""
        times: list[list[float]] = [[] for _ in keys]
        for i in range(runs + 1):
            for key, out in zip(keys, times):
                engine.tree = trees[key]
                start = time.perf_counter()
                engine._step(hidden_E, root, session)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first run is a warm-up
                    out.append(time.perf_counter() - start)
                model.keep(session, 0, None, cache_len)
                del session.token_ids[cache_len:]
        return [1000 * min(t) for t in times]

    first: dict[tuple[str, int], float] = {}
    for n in sorted({*sizes, *dynamic_sizes}):
        keys = [key for key in (("static", n), ("dynamic", n)) if key in trees]
        first.update(zip(keys, fastest(keys, repeats)))

    def curve(kind: str, kind_sizes: Sequence[int]) -> dict[int, float]:
        label = "dynamic tree" if kind == "dynamic" else "step"

        def report(size: int, ms: float, again: bool) -> None:
            if progress:
                progress(f"{label} with {size:>3} nodes{', timed again' if again else ''}: "
                         f"{ms:.2f} ms")  # fmt: skip

        return latency_curve(
            kind_sizes, lambda n, runs: fastest([(kind, n)], runs)[0], repeats, report,
            first={n: first[kind, n] for n in kind_sizes},
        )  # fmt: skip

    try:
        return curve("static", sizes), curve("dynamic", dynamic_sizes)
    finally:
        engine.set_tree(saved)
        engine.lookup_branch = saved_branch


def latency_curve(
    sizes: Sequence[int],
    fastest_ms: Callable[[int, int], float],
    repeats: int,
    report: Callable[[int, float, bool], None] = lambda size, ms, again: None,
    first: dict[int, float] | None = None,
) -> dict[int, float]:
    """`fastest_ms(size, repeats)` for each size (or `first`, when already measured), disturbed
    sizes timed again with `2 * repeats` more runs (in passes, until no size is slower than the
    next), then made non-decreasing: verifying more nodes never costs less, and `choose_tree`'s
    optimality argument needs that. Without the re-timing, one disturbed size would raise every
    larger size with it and flatten the curve's slope there, so the tuner would see nodes as
    cheaper than they are."""
    measured = dict(first) if first is not None else {n: fastest_ms(n, repeats) for n in sizes}
    for size in sizes:
        report(size, measured[size], False)
    for _ in range(len(sizes)):  # a faster re-timing can expose the size below it: repeat
        disturbed = [a for a, b in zip(sizes, sizes[1:]) if measured[a] > measured[b]]
        if not disturbed:
            break
        for size in disturbed:
            measured[size] = min(measured[size], fastest_ms(size, 2 * repeats))
            report(size, measured[size], True)
    latency: dict[int, float] = {}
    for size in sizes:
        latency[size] = max(measured[size], max(latency.values(), default=0.0))
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


# (hidden_E at t, text, t): one calibration position (`calibration_positions`)
Position = tuple[torch.Tensor, list[int], int]


def calibration_positions(
    engine: MedusaGenerator, prompts: Sequence[Sequence[int]], new_tokens: int
) -> Iterator[Position]:
    """Each position t of the calibration continuations that has K + 1 true tokens after it (the
    root at t + 1, then one per head). Tuning reads them twice (static ranks, dynamic trees):
    collect them once with `list(...)`.

    The "true" continuation is the base model's own greedy output, as the engine would emit.
    """
    if engine.drafter is None:
        raise ValueError("tuning a tree needs heads")
    model, k_heads = engine.model, engine.drafter.num_heads
    plain = MedusaGenerator(model, None, "plain")
    for ids in prompts:
        seq = list(ids) + plain.generate(ids, new_tokens).token_ids
        with torch.inference_mode():
            hidden_TE = model.forward(torch.tensor(seq, device=model.device),
                                      torch.arange(len(seq), device=model.device),
                                      model.new_session())  # fmt: skip
        for t in range(len(ids) - 1, len(seq) - k_heads - 1):
            yield hidden_TE[t], seq, t


@torch.inference_mode()
def head_ranks(engine: MedusaGenerator, positions: Sequence[Position], top_k: int) -> torch.Tensor:
    """rank_TK: rank of the true token t + k + 2 in head k's top-k at position t (top_k if absent)."""
    assert engine.drafter is not None
    k_heads, ranks = engine.drafter.num_heads, []
    for hidden_E, seq, t in positions:
        path_K = seq[t + 1 : t + 1 + k_heads]  # the root, then the true tokens
        top_KR = engine.drafter.path_topk(hidden_E, path_K, seq[: t + 1], top_k)
        truth_K = torch.tensor(seq[t + 2 : t + 2 + k_heads], device=top_KR.device)
        hit_KR = top_KR == truth_K[:, None]
        ranks.append(torch.where(hit_KR.any(-1), hit_KR.int().argmax(-1), top_k).cpu())
    if not ranks:
        raise ValueError("calibration produced no positions: give longer continuations")
    return torch.stack(ranks)


def prompt_segments(positions: Sequence[Position]) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of `positions` that belong to one prompt (consecutive t)."""
    segments: list[tuple[int, int]] = []
    for i, (_, seq, _) in enumerate(positions):
        if i == 0 or seq is not positions[i - 1][1]:
            segments.append((i, i))
        segments[-1] = (segments[-1][0], i + 1)
    return segments


def walk_tau(accepted_T: Sequence[int], segments: Sequence[tuple[int, int]]) -> float:
    """τ along the engine's own path: from each prompt's first position, a step at t accepts
    a(t) tokens and emits a(t) + 1, and the next step starts at t + a(t) + 1.

    This, not the mean of 1 + a(t) over all positions, is what generation sees: a long accept
    skips the positions after it, so the plain mean over-weights the easy stretches (with the
    bundled heads it read 2.89 where the walk reads 2.77 for `dynamic:64`).
    """
    tokens = steps = 0
    for lo, hi in segments:
        i = lo
        while i < hi:
            tokens += accepted_T[i] + 1
            steps += 1
            i += accepted_T[i] + 1
    if not steps:
        raise ValueError("calibration produced no positions: give longer continuations")
    return tokens / steps


@torch.inference_mode()
def dynamic_taus(
    engine: MedusaGenerator, positions: Sequence[Position], sizes: Sequence[int]
) -> dict[int, float]:
    """τ of `dynamic:n` trees along the engine's path (`walk_tau`); a(t) = depth of the deepest
    node whose path is the true continuation."""
    assert engine.drafter is not None
    specs = {n: DynamicTree(n).for_heads(engine.drafter.num_heads) for n in sizes}
    accepted: dict[int, list[int]] = {n: [] for n in sizes}
    for hidden_E, seq, t in positions:
        root = torch.tensor(seq[t + 1], device=hidden_E.device)
        for n, spec in specs.items():
            tokens_N, tree = engine.drafter.draft_dynamic(hidden_E, root, spec, seq[: t + 1])
            candidates_NL = path_tokens(tokens_N, tree)
            truth_L = torch.tensor(seq[t + 1 : t + 1 + candidates_NL.shape[1]], device=root.device)
            match_NL = (candidates_NL[:, 1:] == truth_L[1:]).to(torch.int64).cumprod(dim=1)
            accepted[n].append(int(match_NL.sum(dim=1).max()))
    segments = prompt_segments(positions)
    return {n: walk_tau(accepted[n], segments) for n in sizes}


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


@dataclass(frozen=True)
class Calibration:
    """The heads' ranks of the true tokens at the calibration positions (`head_ranks`), and
    which positions belong to which prompt: what static trees are chosen and scored from."""

    rank_TK: torch.Tensor
    segments: list[tuple[int, int]]
    top_k: int

    @cached_property
    def value(self) -> Callable[[TreePath], float]:
        """Each node's probability of acceptance at a random position (`node_values`)."""
        return node_values(self.rank_TK, self.top_k)

    def join_TK(self, ranked: Sequence[TreePath]) -> torch.Tensor:
        """join_TK[t, d]: the smallest n for which the tree of the first n paths of `ranked` (a
        list in which parents come first) accepts d + 1 tokens at position t (never: len + 1)."""
        join = {path: n for n, path in enumerate(ranked, start=1)}
        never = len(ranked) + 1
        rows = self.rank_TK.tolist()
        join_TK = torch.tensor([[join.get(tuple(row[: d + 1]), never) for d in range(len(row))]
                                for row in rows], dtype=torch.int64)  # fmt: skip
        return join_TK.reshape(self.rank_TK.shape).cummax(dim=1).values

    def taus(self, ranked: Sequence[TreePath]) -> list[float]:
        """`walk_tau` of the tree of the first n paths of `ranked`, for n = 1 .. len(ranked)."""
        join_TK = self.join_TK(ranked)
        return [
            walk_tau((join_TK <= n).sum(dim=1).tolist(), self.segments)
            for n in range(1, len(ranked) + 1)
        ]

    def tau(self, paths: Sequence[Sequence[int]]) -> float:
        """`walk_tau` of the tree of `paths`. Nodes of rank >= top_k were never observed: they
        count as never accepted (but still cost their latency in `score_tree`)."""
        seen = sorted({tuple(p) for p in paths if max(p) < self.top_k}, key=len)  # parents first
        accepted_T = (self.join_TK(seen) <= len(seen)).sum(dim=1).tolist()
        return walk_tau(accepted_T, self.segments)


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
    paths: Sequence[Sequence[int]], calibration: Calibration, latency: dict[int, float]
) -> tuple[float, float]:
    """(τ along the engine's path, predicted step ms) of a tree under the same measurements."""
    return calibration.tau(paths), interpolate(latency, len(paths) + 1)


def choose_tree(
    calibration: Calibration,
    latency: dict[int, float],
    num_heads: int,
    others: Sequence[Sequence[Sequence[int]]] = (),
) -> tuple[list[TreePath], float, float]:
    """The tree maximising τ / latency: (paths, τ, step ms). Candidates: every prefix of the
    best-first list (the n-node tree of most accepted tokens per position, for each n), and
    `others` (e.g. the presets), all scored by `walk_tau` on the same measurements."""
    ranked = [p for p, _ in best_first(calibration.value, num_heads, calibration.top_k,
                                       max(latency))]  # fmt: skip
    candidates = [(ranked[:n], tau) for n, tau in enumerate(calibration.taus(ranked), start=1)]
    candidates += [([tuple(p) for p in paths], calibration.tau(paths)) for paths in others]
    best: tuple[list[TreePath], float, float] = ([], 1.0, latency[min(latency)])
    for paths, tau in candidates:
        ms = interpolate(latency, len(paths) + 1)
        if tau / ms > best[1] / best[2]:
            best = (paths, tau, ms)
    return best


def tune(
    engine: MedusaGenerator,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    new_tokens: int = 64,
    top_k: int = 10,
    sizes: Sequence[int] = LATENCY_SIZES,
    progress: Callable[[str], None] | None = None,
    dynamic: bool = True,
) -> tuple[TunedTree, Calibration]:
    """Measure, estimate and choose (`dynamic`: dynamic trees compete too); returns the tuned
    tree and the calibration that scores static trees (`score_tree`)."""
    if engine.drafter is None:
        raise ValueError("tuning a tree needs heads (--heads)")
    num_heads = engine.drafter.num_heads
    prompts = prompts if prompts is not None else calibration_prompts(engine.model.tokenizer)
    # Static (CUDA-graph) steps take static trees only.
    dyn_sizes = (
        [n for n in sizes if n >= DYNAMIC_MIN_NODES] if dynamic and not engine.static else []
    )
    if progress:
        kinds = "static and dynamic trees" if dyn_sizes else "trees"
        progress(f"measuring step latency for {kinds} of {min(sizes)}..{max(sizes)} nodes")
    latency, dyn_latency = measure_latency(
        engine, sizes, progress=progress, dynamic_sizes=dyn_sizes
    )
    if progress:
        progress(f"estimating head acceptance on {len(prompts)} calibration prompts")
    positions = list(calibration_positions(engine, prompts, new_tokens))
    calibration = Calibration(head_ranks(engine, positions, top_k), prompt_segments(positions),
                              top_k)  # fmt: skip
    presets = [[p for p in paths if len(p) <= num_heads] for paths in TREE_PRESETS.values()]
    paths, tau, ms = choose_tree(calibration, latency, num_heads, [p for p in presets if p])
    tuned = TunedTree([list(p) for p in paths], tau, ms, latency, len(positions))
    if not dyn_sizes:
        return tuned, calibration
    if progress:
        progress(f"measuring dynamic trees of {min(dyn_sizes)}..{max(dyn_sizes)} nodes")
    dyn_tau = dynamic_taus(engine, positions, dyn_sizes)
    best = max(dyn_sizes, key=lambda n: dyn_tau[n] / dyn_latency[n])
    tuned = replace(tuned, dynamic_tau=dyn_tau, dynamic_latency_ms=dyn_latency)
    if dyn_tau[best] / dyn_latency[best] > tau / ms:
        tuned = replace(tuned, dynamic_nodes=best, predicted_tau=dyn_tau[best],
                        step_ms=dyn_latency[best])  # fmt: skip
    return tuned, calibration


def cache_key(model: HFModel, heads_dir: Path | None, drafting: str = "") -> str:
    """Model + heads (content) + device + dtype + threads + how the drafter computes (int8 or
    not: its cost moves the best tree): what the tuned tree depends on."""
    h = hashlib.sha256()
    h.update(f"{model.name}|{model.device}|{model.dtype}|{torch.get_num_threads()}".encode())
    h.update(drafting.encode())
    if heads_dir is not None:
        for f in sorted(Path(heads_dir).glob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".pt", ".json"):
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def auto_tree(
    engine: MedusaGenerator, heads_dir: Path | None, progress: Callable[[str], None]
) -> TunedTree:
    """The cached tuned tree for this model + heads + device + dtype, tuning on first use."""
    key = cache_key(engine.model, heads_dir, f"int8={getattr(engine.drafter, 'int8', False)}")
    path = cache_dir() / "trees" / f"{key}.json"
    if path.is_file():
        return TunedTree.load(path)
    progress(f"tuning the tree for this model, heads and device (once; cached at {path})")
    tuned, _ = tune(engine, progress=progress)
    tuned = TunedTree(**{**asdict(tuned), "key": key})
    tuned.save(path)
    return tuned
