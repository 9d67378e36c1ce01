"""Batched decoding: one verification forward for B requests at once (continuous batching's step).

Shape legend (ARCHITECTURE.md): B rows, N tree nodes (the batch's largest tree), E hidden size,
V vocabulary, T prompt tokens of one prefill chunk.

Each row is one request in one row of a `RowKVCache`, with its own tree (the engine's tree,
shaped per row when it is dynamic, plus the row's own prompt-lookup branch), its own positions
(its length + node depth), its own acceptance rule, sampling config and generator (so a
request's output does not depend on its neighbours), its own accepted length and next root.
One step:

1. propose per row (`MedusaGenerator.propose`), trees padded to N nodes with masked nodes that
   see only their row's prefix and themselves;
2. verify: one forward over [B, N] (`CausalLM.forward_rows`), each row attending its own
   prefix and tree;
3. accept per row (`acceptance.decide_rows`: all rows' kept paths read in one host transfer);
4. commit: every row keeps its path, one gather and one scatter for the whole batch
   (`RowKVCache.compact`).

Greedy rows produce exactly the tokens of their batch-1 decode (tested in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attention.row_kv_cache import RowKVCache
from medusa_engine.acceptance import decide_rows
from medusa_engine.candidates import path_tokens
from medusa_engine.config import SamplingConfig
from medusa_engine.generate import MedusaGenerator, Proposal
from medusa_engine.model import DecodeState
from medusa_engine.sampling import choose_token
from medusa_engine.tree import TreeBuffers


@dataclass
class RowState:
    """One request's decoding state: the ids whose keys/values its cache row holds, its
    sampling config and generator, and (once prefilled) the state before its next step."""

    sampling: SamplingConfig
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)
    state: DecodeState | None = None


class BatchDecoder:
    """Prefill chunks and batched steps of an engine's model and drafter over a `RowKVCache`."""

    def __init__(self, engine: MedusaGenerator, cache: RowKVCache) -> None:
        self.engine = engine
        self.model = engine.model
        self.cache = cache

    @torch.inference_mode()
    def prefill(self, row: int, rs: RowState, ids: Sequence[int], final: bool) -> None:
        """Feed `ids` (a chunk of the prompt) into cache row `row` after what it holds; the
        final chunk also picks the row's first token (the root of its first tree)."""
        past = len(rs.token_ids)
        if self.cache.lengths[row] != past:
            raise RuntimeError(f"row {row} holds {self.cache.lengths[row]} slots, not {past}")
        device = self.model.device
        ids_1T = torch.tensor([list(ids)], dtype=torch.int64, device=device)
        pos_1T = torch.arange(past, past + len(ids), device=device)[None]
        hidden_1TE = self.model.forward_rows(ids_1T, pos_1T, self.cache, range(row, row + 1))
        rs.token_ids.extend(int(t) for t in ids)
        if final:
            hidden_E = hidden_1TE[0, -1]
            root = choose_token(self.model.logits(hidden_E), rs.sampling, rs.generator)
            rs.state = DecodeState(hidden_E, int(root))

    @torch.inference_mode()
    def step(self, rows: range, states: Sequence[RowState]) -> list[list[int]]:
        """One verification step of cache rows `rows` (contiguous, each prefilled); returns the
        tokens each row emits (its accepted candidates, then the bonus token)."""
        model = self.model
        starts = [len(rs.token_ids) for rs in states]
        proposals = self.propose(states, starts)
        tokens_BN, positions_BN, block = _pad(proposals, starts, model.device)
        hidden_BNE = model.forward_rows(tokens_BN, positions_BN, self.cache, rows, block)
        logits_BNV = model.logits(hidden_BNE)
        decisions = decide_rows(
            [
                (
                    logits_BNV[b, : p.tree.num_nodes],
                    path_tokens(p.tokens_N, p.tree),
                    p.tree.paths_PL,
                )
                for b, p in enumerate(proposals)
            ],
            [rs.sampling for rs in states],
            [rs.generator for rs in states],
        )
        self.cache.compact(rows, starts, [d.nodes for d in decisions])
        emitted = []
        for b, (rs, d) in enumerate(zip(states, decisions, strict=True)):
            rs.token_ids.extend(d.tokens)
            rs.state = DecodeState(hidden_BNE[b, d.nodes[-1]], d.next_token)
            emitted.append(d.emitted)
        return emitted

    def propose(self, states: Sequence[RowState], starts: Sequence[int]) -> list[Proposal]:
        """Each row's proposal; a static tree is drafted for all rows at once when the drafter
        can (`draft_rows`), then each row gets its own lookup branch."""
        engine = self.engine
        tree, draft_rows = engine.tree, getattr(engine.drafter, "draft_rows", None)
        near_end = [engine.near_end(past) for past in starts]
        decode = [_prefilled(rs) for rs in states]
        if draft_rows is None or not isinstance(tree, TreeBuffers) or any(near_end):
            return [
                engine.propose(d, rs.token_ids, near)
                for d, rs, near in zip(decode, states, near_end, strict=True)
            ]
        hidden_BE = torch.stack([d.hidden_E for d in decode])
        roots_B = torch.tensor([d.root for d in decode], device=hidden_BE.device)
        tokens_BN = draft_rows(hidden_BE, roots_B, tree)
        return [
            engine.add_lookup(Proposal(tree, tokens_BN[b]), rs.token_ids, d.root)
            for b, (d, rs) in enumerate(zip(decode, states, strict=True))
        ]


def _prefilled(rs: RowState) -> DecodeState:
    if rs.state is None:
        raise RuntimeError("a row steps only once it is prefilled")
    return rs.state


def _pad(
    proposals: Sequence[Proposal], starts: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens_BN, positions_BN and the tree mask ([N, N] when every row has the same tree,
    else [B, N, N]) of the rows' trees padded to N nodes. A padding node is token 0 at its
    row's next position; it sees its row's prefix and itself, and no real node sees it."""
    n = max(p.tree.num_nodes for p in proposals)
    trees = {id(p.tree) for p in proposals}
    start_B1 = torch.tensor(starts, device=device)[:, None]
    if len(trees) == 1:
        tree = proposals[0].tree
        tokens_BN = torch.stack([p.tokens_N for p in proposals])
        return tokens_BN, start_B1 + tree.depth_N, tree.mask_NN
    b = len(proposals)
    tokens_BN = torch.zeros(b, n, dtype=torch.int64, device=device)
    depth_BN = torch.zeros(b, n, dtype=torch.int64, device=device)
    mask_BNN = torch.eye(n, dtype=torch.bool, device=device).repeat(b, 1, 1)
    for i, p in enumerate(proposals):
        k = p.tree.num_nodes
        tokens_BN[i, :k] = p.tokens_N
        depth_BN[i, :k] = p.tree.depth_N
        mask_BNN[i, :k, :k] = p.tree.mask_NN
    return tokens_BN, start_B1 + depth_BN, mask_BNN
