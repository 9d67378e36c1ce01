"""Choose the tree for the hardware: maximise τ per unit of step latency.

Shape legend (ARCHITECTURE.md): T calibration positions, J draft heads (depths), R top-k ranks.

1. **Latency curve.** The engine's real verification step (heads, candidates, forward, acceptance,
   compaction) is timed for trees of n nodes over a cache of `cache_len` tokens, on the current
   device and dtype; sizes between measured points are interpolated. The timed trees are as deep
   as the heads allow (a recurrent drafter pays per depth), so small trees are not flattered.
2. **Acceptance** (`calibration.py`): the heads' ranks of the true tokens at every position of
   greedy continuations of the calibration prompts; a tree accepts a(t) tokens at position t.
3. **τ along the engine's path** (`calibration.walk_tau`). Generation does not visit every position: a step
   at t emits a(t) + 1 tokens and the next one starts at t + a(t) + 1. Walking each calibration
   text that way gives the τ the engine would see on it (for greedy decoding, exactly: tested);
   the mean of 1 + a(t) over all positions over-weights the easy stretches a long accept skips.
4. **Tree.** A node's value (`calibration.node_values`) is the frequency of its rank prefix: the joint
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from attention.state_files import atomic_write
from medusa_engine.calibration import (
    Calibration,
    TreePath,
    calibration_positions,
    calibration_prompts,
    dynamic_taus,
    head_ranks,
    prompt_segments,
)
from medusa_engine.dynamic_tree import DynamicTree
from medusa_engine.generate import MedusaGenerator
from medusa_engine.model import CausalLM
from medusa_engine.models import cache_dir
from medusa_engine.tree import TreeBuffers, build_tree
from medusa_engine.tree_spec import parse_tree
from medusa_engine.trees import TREE_PRESETS

log = logging.getLogger(__name__)

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

    def spec(self) -> DynamicTree | list[list[int]]:
        """The chosen tree, for `tree_spec.parse_tree`: `dynamic:N` or the static paths."""
        return DynamicTree(self.dynamic_nodes) if self.dynamic_nodes else self.paths

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
    machine's speed drifting during tuning weighs on both alike. A size that measured slower than a larger one of its kind was disturbed:
    it is timed again (`latency_curve`) before the curve is made non-decreasing.

    Long on purpose: the timing closures share the one prefilled session and the trees' engines.
    """
    model, drafter = engine.model, engine.drafter
    heads = drafter.num_heads if drafter is not None else 0
    sizes = [s for s in sizes if s == 1 or heads > 0]
    dynamic_sizes = [s for s in dynamic_sizes if heads > 0]
    cache_len = min(cache_len, model.max_context - max([*sizes, *dynamic_sizes]) - 8)
    prompt = torch.randint(
        3, model.vocab_size, (cache_len,), generator=torch.Generator().manual_seed(0)
    )
    session = model.new_session()
    state = engine.prefill(prompt.tolist(), session)

    def timed(tree: TreeBuffers | DynamicTree) -> MedusaGenerator:
        """An engine on `tree` alone (a lookup branch comes only with a match), its tree on the
        device and resolved for these heads once, not in the timed runs."""
        resolved = parse_tree(tree, drafter)
        return MedusaGenerator(model, drafter, resolved, engine.sampling, static=engine.static)

    engines: dict[tuple[str, int], MedusaGenerator] = {
        **{("static", n): timed(synthetic_tree(n, max(heads, 1))) for n in sizes},
        **{("dynamic", n): timed(DynamicTree(n)) for n in dynamic_sizes},
    }

    def fastest(keys: Sequence[tuple[str, int]], runs: int) -> list[float]:
        """Fastest of `runs` steps (after a warm-up) for each tree, the trees taking turns."""
        times: list[list[float]] = [[] for _ in keys]
        for i in range(runs + 1):
            for key, out in zip(keys, times):
                start = time.perf_counter()
                engines[key].step(state, session)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first run is a warm-up
                    out.append(time.perf_counter() - start)
                session.truncate(cache_len)
        return [1000 * min(t) for t in times]

    first: dict[tuple[str, int], float] = {}
    for n in sorted({*sizes, *dynamic_sizes}):
        keys = [key for key in (("static", n), ("dynamic", n)) if key in engines]
        first.update(zip(keys, fastest(keys, repeats)))

    def curve(kind: str, kind_sizes: Sequence[int]) -> dict[int, float]:
        label = "dynamic tree" if kind == "dynamic" else "step"

        def report(size: int, ms: float, again: bool) -> None:
            if progress:
                progress(
                    f"{label} with {size:>3} nodes{', timed again' if again else ''}: {ms:.2f} ms"
                )

        return latency_curve(
            kind_sizes,
            lambda n, runs: fastest([(kind, n)], runs)[0],
            repeats,
            report,
            first={n: first[kind, n] for n in kind_sizes},
        )

    return curve("static", sizes), curve("dynamic", dynamic_sizes)


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


# ---- 2. tree --------------------------------------------------------------------------------------


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
    ranked = [
        p for p, _ in best_first(calibration.value, num_heads, calibration.top_k, max(latency))
    ]
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
    calibration = Calibration(
        head_ranks(engine, positions, top_k), prompt_segments(positions), top_k
    )
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
        tuned = replace(
            tuned, dynamic_nodes=best, predicted_tau=dyn_tau[best], step_ms=dyn_latency[best]
        )
    return tuned, calibration


def cache_key(model: CausalLM, heads_dir: Path | None, drafting: str = "") -> str:
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
        try:
            return TunedTree.load(path)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # a bad entry
            log.warning("ignoring the unreadable tuned tree %s (%s): tuning again", path, err)
    progress(f"tuning the tree for this model, heads and device (once; cached at {path})")
    tuned, _ = tune(engine, progress=progress)
    tuned = TunedTree(**{**asdict(tuned), "key": key})
    tuned.save(path)
    return tuned
