"""What the heads accept on real text: the calibration measurements the tuner scores trees by.

Shape legend (ARCHITECTURE.md): T calibration positions, J draft heads (depths), R top-k ranks.

Calibration prompts (hand-written, in no evaluation set) are continued greedily; one
teacher-forced forward gives the last hidden state at every position t, and each head's top-R
there (recurrent heads read the true tokens before depth j: `Drafter.path_topk`).
`rank_TJ[t, j]` = rank of the true token t + j + 2 in head j's top-R (R if absent). A node with
path (r_0, ..., r_d) is accepted at t exactly when rank_TJ[t, :d+1] == path, so a tree accepts
a(t) = the length of the longest rank prefix of row t among its paths; `walk_tau` turns a(t) into
the τ that generation sees.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from medusa_engine.candidates import path_tokens
from medusa_engine.dynamic_tree import DynamicTree
from medusa_engine.generate import MedusaGenerator
from medusa_engine.hf_adapter import encode_prompt
from medusa_engine.models import ASSETS
from medusa_engine.tree import build_tree

TreePath = tuple[int, ...]


def calibration_prompts(tokenizer, limit: int | None = None) -> list[list[int]]:
    """Token ids of the bundled calibration prompts: the instructions through the chat template
    when the tokenizer has one, else the story openings as plain text."""
    rows = [json.loads(line) for line in (ASSETS / "calibration_prompts.jsonl").open()]
    kind = "instruction" if getattr(tokenizer, "chat_template", None) else "story"
    return [encode_prompt(tokenizer, row["text"]) for row in rows[:limit] if row["kind"] == kind]


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
    model, depths = engine.model, engine.drafter.num_heads
    plain = MedusaGenerator(model, None, build_tree([], 0))
    for ids in prompts:
        seq = list(ids) + plain.generate(ids, new_tokens).token_ids
        with torch.inference_mode():
            hidden_TE = model.forward(
                torch.tensor(seq, device=model.device),
                torch.arange(len(seq), device=model.device),
                model.new_session(),
            )
        for t in range(len(ids) - 1, len(seq) - depths - 1):
            yield hidden_TE[t], seq, t


@torch.inference_mode()
def head_ranks(engine: MedusaGenerator, positions: Sequence[Position], top_k: int) -> torch.Tensor:
    """rank_TJ: rank of the true token t + k + 2 in head k's top-k at position t (top_k if absent)."""
    assert engine.drafter is not None
    depths, ranks = engine.drafter.num_heads, []
    for hidden_E, seq, t in positions:
        path_J = seq[t + 1 : t + 1 + depths]  # the root, then the true tokens
        top_JR = engine.drafter.path_topk(hidden_E, path_J, seq[: t + 1], top_k)
        truth_J = torch.tensor(seq[t + 2 : t + 2 + depths], device=top_JR.device)
        hit_JR = top_JR == truth_J[:, None]
        ranks.append(torch.where(hit_JR.any(-1), hit_JR.int().argmax(-1), top_k).cpu())
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
    skips the positions after it, so the plain mean over-weights the easy stretches.
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


def node_values(rank_TJ: torch.Tensor, top_k: int) -> Callable[[TreePath], float]:
    """value(path) = fraction of positions whose rank prefix equals `path` (joint frequency).

    Ranks >= top_k were not observed (rank_TJ uses top_k for "absent"): their value is 0.
    """
    total = rank_TJ.shape[0]
    counts: Counter[TreePath] = Counter()
    for row in rank_TJ.tolist():
        for d in range(len(row)):
            counts[tuple(row[: d + 1])] += 1
    return lambda path: 0.0 if max(path) >= top_k else counts.get(tuple(path), 0) / total


@dataclass(frozen=True)
class Calibration:
    """The heads' ranks of the true tokens at the calibration positions (`head_ranks`), and
    which positions belong to which prompt: what static trees are chosen and scored from."""

    rank_TJ: torch.Tensor
    segments: list[tuple[int, int]]
    top_k: int

    @cached_property
    def value(self) -> Callable[[TreePath], float]:
        """Each node's probability of acceptance at a random position (`node_values`)."""
        return node_values(self.rank_TJ, self.top_k)

    def join_TJ(self, ranked: Sequence[TreePath]) -> torch.Tensor:
        """join_TJ[t, d]: the smallest n for which the tree of the first n paths of `ranked` (a
        list in which parents come first) accepts d + 1 tokens at position t (never: len + 1)."""
        join = {path: n for n, path in enumerate(ranked, start=1)}
        never = len(ranked) + 1
        rows = self.rank_TJ.tolist()
        join_TJ = torch.tensor(
            [[join.get(tuple(row[: d + 1]), never) for d in range(len(row))] for row in rows],
            dtype=torch.int64,
        )
        return join_TJ.reshape(self.rank_TJ.shape).cummax(dim=1).values

    def taus(self, ranked: Sequence[TreePath]) -> list[float]:
        """`walk_tau` of the tree of the first n paths of `ranked`, for n = 1 .. len(ranked)."""
        join_TJ = self.join_TJ(ranked)
        return [
            walk_tau((join_TJ <= n).sum(dim=1).tolist(), self.segments)
            for n in range(1, len(ranked) + 1)
        ]

    def tau(self, paths: Sequence[Sequence[int]]) -> float:
        """`walk_tau` of the tree of `paths`. Nodes of rank >= top_k were never observed: they
        count as never accepted (but still cost their latency in `score_tree`)."""
        seen = sorted({tuple(p) for p in paths if max(p) < self.top_k}, key=len)  # parents first
        accepted_T = (self.join_TJ(seen) <= len(seen)).sum(dim=1).tolist()
        return walk_tau(accepted_T, self.segments)
