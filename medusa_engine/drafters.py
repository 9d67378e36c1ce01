"""Drafters: what proposes the tree's tokens at each step.

Shape legend (ARCHITECTURE.md): E hidden size, V vocabulary, J draft heads (depths), N tree
nodes, L path length, R top-k ranks, M draft vocabulary, B rows.

A drafter fills a tree (`TreeBuffers`) given the hidden state of the last kept token and the root
(the base model's own next token). Two kinds:

* `LogitsDrafter` (Medusa heads): one set of logits_JV per step, independent of the tree's
  tokens; node i takes entry `topk_index_N[i]` of [root, head 0's top-k, head 1's top-k, ...].
* `RecurrentDrafter`: each node's children come from a state that has read the tokens on the
  node's path (`recurrent_heads.py`); depth by depth, one batched transition per depth.

`draft_dynamic` instead shapes the tree itself each step from the drafter's confidence
(`dynamic_tree.py`, as in EAGLE-2): the same N nodes, spent where the heads are sure.

`path_topk` is what tree tuning measures: the top-k proposals at each depth when the tree follows
a given path (the true continuation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, cast

import torch

from medusa_engine.candidates import fill_tree
from medusa_engine.dynamic_tree import DynamicTree, grow
from medusa_engine.eagle3 import Eagle3Drafter, Eagle3Heads
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import AnyHeads
from medusa_engine.int8_linear import Int8Linear, int8_supported
from medusa_engine.model import CausalLM
from medusa_engine.recurrent_heads import MAX_UNROLL, RecurrentHeads
from medusa_engine.tree import TreeBuffers


class Drafter(Protocol):
    num_heads: int  # depths the drafter was trained for (static trees go this deep)
    draft_vocab_size: int  # tokens it scores per node: no tree may ask for more ranks

    @property
    def max_depth(self) -> int:
        """How deep a dynamic tree may grow (>= num_heads)."""
        ...

    def draft(
        self,
        hidden_E: torch.Tensor,
        root: torch.Tensor,
        tree: TreeBuffers,
        token_ids: Sequence[int],
    ) -> torch.Tensor:
        """tree_tokens_N: the root (0-d tensor) at node 0, proposals at the other nodes."""
        ...

    def draft_dynamic(
        self,
        hidden_E: torch.Tensor,
        root: torch.Tensor,
        spec: DynamicTree,
        token_ids: Sequence[int],
    ) -> tuple[torch.Tensor, TreeBuffers]:
        """(tree_tokens_N, tree): a tree shaped by this step's confidence (`dynamic_tree.py`)."""
        ...

    def path_topk(
        self, hidden_E: torch.Tensor, path_L: Sequence[int], token_ids: Sequence[int], top_k: int
    ) -> torch.Tensor:
        """ids_LR: top-k proposals for depth d + 1 when nodes 0..d hold path_L[0..d]."""
        ...


class LogitsDrafter:
    """Base of drafters whose logits do not depend on the tree's tokens; define `logits`."""

    num_heads: int
    draft_vocab_size: int
    confidence_temp_J: torch.Tensor | None = None  # confidence temperature per head (None: 1)

    @property
    def max_depth(self) -> int:
        return self.num_heads  # one head per depth

    def logits(self, hidden_E: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """logits_JV for the J tokens after the base model's next token."""
        raise NotImplementedError

    def draft(
        self,
        hidden_E: torch.Tensor,
        root: torch.Tensor,
        tree: TreeBuffers,
        token_ids: Sequence[int],
    ) -> torch.Tensor:
        return fill_tree(root, self.logits(hidden_E, token_ids), tree)

    @torch.inference_mode()
    def draft_dynamic(
        self,
        hidden_E: torch.Tensor,
        root: torch.Tensor,
        spec: DynamicTree,
        token_ids: Sequence[int],
    ) -> tuple[torch.Tensor, TreeBuffers]:
        logits_JV = self.logits(hidden_E, token_ids).float()
        if self.confidence_temp_J is not None:
            logits_JV = logits_JV / self.confidence_temp_J[:, None]
        logp_JV = torch.log_softmax(logits_JV, dim=-1)
        depth = iter(range(spec.depth))

        def expand(rows_B: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
            return logp_JV[next(depth)].expand(rows_B.shape[0], -1)  # the same for every parent

        return grow(spec, root, expand)

    def path_topk(
        self, hidden_E: torch.Tensor, path_L: Sequence[int], token_ids: Sequence[int], top_k: int
    ) -> torch.Tensor:
        return torch.topk(self.logits(hidden_E, token_ids)[: len(path_L)], top_k, dim=-1).indices


def use_int8(requested: bool | None, device: torch.device) -> bool:
    """Whether a drafter runs its matrices with int8 weights: as requested, else (None) wherever
    `int8_supported` (a CPU); asking for it where it cannot run is an error."""
    supported = int8_supported(device)
    if requested and not supported:
        raise ValueError(
            f"int8 drafting needs a CPU with a quantized engine (model on {device}); "
            "pass int8=False"
        )
    return supported if requested is None else requested


class HeadsDrafter(LogitsDrafter):
    """Medusa heads (the shared LM head, if any, is the base model's).

    `int8` as for `RecurrentDrafter`: the vocabulary projection (the shared LM head, or each
    head's own) runs with int8 weights, J rows over the whole vocabulary per step."""

    def __init__(self, heads: MedusaHeads, model: CausalLM, int8: bool | None = None) -> None:
        heads.check_compatible(model.hidden_size, model.vocab_size, model.name)
        self.int8 = use_int8(int8, model.device)
        self.heads = heads.to(device=model.device, dtype=model.dtype).eval()
        self.lm_head: torch.nn.Module = model.lm_head
        if self.int8 and heads.lm_heads is None:
            self.lm_head = Int8Linear(model.lm_head.weight, getattr(model.lm_head, "bias", None))
        elif self.int8 and heads.lm_heads is not None:  # each head has its own projection
            self.heads = copy.deepcopy(self.heads)  # the caller's heads stay as they were
            self.heads.lm_heads = torch.nn.ModuleList(
                Int8Linear(cast(torch.nn.Linear, proj).weight) for proj in heads.lm_heads
            )
        self.num_heads = heads.num_heads
        self.draft_vocab_size = heads.config.vocab_size
        if heads.config.confidence_temperature:
            temps = [heads.config.confidence_temp(d) for d in range(1, self.num_heads + 1)]
            self.confidence_temp_J = torch.tensor(temps, device=model.device)

    @torch.inference_mode()
    def logits(self, hidden_E: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        return self.heads(hidden_E[None], self.lm_head)[0]


@dataclass(frozen=True)
class _DepthPlan:
    """One depth d of a tree, for the recurrent drafter (tensors on the model's device)."""

    nodes: torch.Tensor  # nodes at depth d with children: they get a state
    parent_rows: torch.Tensor  # each one's parent among depth d - 1's stateful nodes (0: h_t)
    children: torch.Tensor  # nodes at depth d + 1
    slots: torch.Tensor  # each child's entry in the flattened top-k of `nodes`: row * R + rank


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def depth_plans(tree: TreeBuffers) -> list[_DepthPlan]:
    """Per depth: which nodes advance a state, from which parent, and where children read."""
    depth = tree.depth_N.tolist()
    parent = tree.parent_N.tolist()
    rank = ((tree.topk_index_N - 1) % tree.top_k).tolist()
    device = tree.depth_N.device
    has_children = set(parent[1:])
    plans, prev_rows = [], {-1: 0}
    for d in range(tree.max_depth):
        nodes = [i for i in range(tree.num_nodes) if depth[i] == d and i in has_children]
        rows = {node: r for r, node in enumerate(nodes)}
        children = [i for i in range(tree.num_nodes) if depth[i] == d + 1]
        plans.append(
            _DepthPlan(
                nodes=_ids(nodes, device),
                parent_rows=_ids([prev_rows[parent[i]] for i in nodes], device),
                children=_ids(children, device),
                slots=_ids([rows[parent[c]] * tree.top_k + rank[c] for c in children], device),
            )
        )
        prev_rows = rows
    return plans


class RecurrentDrafter:
    """Recurrent heads (`recurrent_heads.py`) over the base model's embedding and LM head.

    `int8` (default: wherever `int8_supported`, i.e. on a CPU) runs the transition and the draft
    LM head with int8 weights (`int8_linear.py`: ~4x less to read per depth); the caller's heads
    are left as they are. Drafts may differ slightly; verification still decides (`int8_linear`).
    """

    def __init__(self, heads: RecurrentHeads, model: CausalLM, int8: bool | None = None) -> None:
        heads.check_compatible(model.hidden_size, model.vocab_size, model.name)
        self.int8 = use_int8(int8, model.device)
        self.heads = heads.to(device=model.device, dtype=model.dtype).eval()
        self.num_heads = heads.num_heads
        self.embed = model.embed_tokens
        self.vocab_M = self.heads.draft_vocab_M
        self.draft_vocab_size = int(self.vocab_M.numel())
        lm_ME = model.lm_head.weight.detach()[self.vocab_M].contiguous()  # draft vocabulary rows
        # states_BE -> logits_BM over the draft vocabulary
        self._logits: Callable[[torch.Tensor], torch.Tensor]
        if self.int8:
            self.heads = copy.deepcopy(self.heads)
            for name in ("fc1", "fc2"):  # replaces the nn.Linear of that name
                layer = getattr(heads, name)
                self.heads.add_module(name, Int8Linear(layer.weight, layer.bias))
            self._logits = Int8Linear(lm_ME)
        else:
            self._logits = partial(self.heads.logits, draft_lm_ME=lm_ME)
        self._plan_of: tuple[TreeBuffers, list[_DepthPlan]] | None = None

    @property
    def max_depth(self) -> int:
        return MAX_UNROLL * self.num_heads  # one transition serves every depth

    def _plan(self, tree: TreeBuffers) -> list[_DepthPlan]:
        """The depth plans of `tree` (kept for the latest tree: it changes rarely)."""
        if self._plan_of is None or self._plan_of[0] is not tree:
            self._plan_of = (tree, depth_plans(tree))
        return self._plan_of[1]

    @torch.inference_mode()
    def draft(
        self,
        hidden_E: torch.Tensor,
        root: torch.Tensor,
        tree: TreeBuffers,
        token_ids: Sequence[int],
    ) -> torch.Tensor:
        tokens_N = root.reshape(1).repeat(tree.num_nodes)
        states_RE = hidden_E[None]
        for plan in self._plan(tree):
            if plan.children.numel() == 0:
                break
            states_RE = self.heads.step(
                states_RE[plan.parent_rows], self.embed(tokens_N[plan.nodes])
            )
            top_RR = self._logits(states_RE).topk(tree.top_k, dim=-1).indices
            tokens_N[plan.children] = self.vocab_M[top_RR.flatten()[plan.slots]]
        return tokens_N

    @torch.inference_mode()
    def draft_rows(
        self, hidden_BE: torch.Tensor, roots_B: torch.Tensor, tree: TreeBuffers
    ) -> torch.Tensor:
        """`draft` for B rows on one static tree at once: tokens_BN (batched decoding)."""
        b = hidden_BE.shape[0]
        tokens_BN = roots_B.reshape(b, 1).repeat(1, tree.num_nodes)
        states_BRE = hidden_BE[:, None]
        for plan in self._plan(tree):
            if plan.children.numel() == 0:
                break
            states_BRE = states_BRE[:, plan.parent_rows]
            r = states_BRE.shape[1]
            emb_BRE = self.embed(tokens_BN[:, plan.nodes])
            states_BRE = self.heads.step(states_BRE.flatten(0, 1), emb_BRE.flatten(0, 1))
            states_BRE = states_BRE.view(b, r, -1)
            top_BRK = self._logits(states_BRE.flatten(0, 1)).topk(tree.top_k, dim=-1).indices
            tokens_BN[:, plan.children] = self.vocab_M[top_BRK.view(b, -1)[:, plan.slots]]
        return tokens_BN

    @torch.inference_mode()
    def draft_dynamic(
        self,
        hidden_E: torch.Tensor,
        root: torch.Tensor,
        spec: DynamicTree,
        token_ids: Sequence[int],
    ) -> tuple[torch.Tensor, TreeBuffers]:
        states_BE, depth = hidden_E[None], 0
        confidence_temp = self.heads.config.confidence_temp

        def expand(rows_B: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
            nonlocal states_BE, depth
            depth += 1
            states_BE = self.heads.step(states_BE[rows_B], self.embed(tokens_B))
            logits_BM = self._logits(states_BE).float()
            return torch.log_softmax(logits_BM / confidence_temp(depth), dim=-1)

        return grow(spec, root, expand, self.vocab_M)

    @torch.inference_mode()
    def path_topk(
        self, hidden_E: torch.Tensor, path_L: Sequence[int], token_ids: Sequence[int], top_k: int
    ) -> torch.Tensor:
        path = torch.as_tensor(list(path_L), dtype=torch.int64, device=hidden_E.device)
        emb_LE = self.embed(path)
        state_1E, out = hidden_E[None], []
        for d in range(len(path_L)):
            state_1E = self.heads.step(state_1E, emb_LE[d : d + 1])
            out.append(self._logits(state_1E).topk(top_k, dim=-1).indices[0])
        return self.vocab_M[torch.stack(out)]


def make_drafter(heads: AnyHeads, model: CausalLM) -> Drafter:
    """The drafter for heads of any kind."""
    if isinstance(heads, RecurrentHeads):
        return RecurrentDrafter(heads, model)
    if isinstance(heads, Eagle3Heads):
        return Eagle3Drafter(heads, model)
    return HeadsDrafter(heads, model)


def with_lookup_branch(tree: TreeBuffers, length: int) -> TreeBuffers:
    """`tree` plus a chain of `length` nodes under the root, appended after its nodes.

    The chain holds a prompt-lookup guess (`LookupBranch`). Appending keeps every root-to-node
    index sequence increasing and parents before children, as compaction needs.
    """
    n, total = tree.num_nodes, tree.num_nodes + length
    device = tree.depth_N.device
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:n, :n] = tree.mask_NN
    chain = torch.arange(n, total, device=device)
    mask[chain, 0] = True
    mask[n:, n:] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    depth = torch.cat([tree.depth_N, torch.arange(1, length + 1, device=device)])
    parent = torch.cat([tree.parent_N, torch.cat([chain.new_zeros(1), chain[:-1]])])
    width = max(tree.paths_PL.shape[1], length + 1)
    paths = torch.full((tree.paths_PL.shape[0] + 1, width), -1, dtype=torch.int64, device=device)
    paths[:-1, : tree.paths_PL.shape[1]] = tree.paths_PL
    paths[-1, : length + 1] = torch.cat([chain.new_zeros(1), chain])
    topk_index = torch.cat([tree.topk_index_N, chain.new_zeros(length)])
    return TreeBuffers(mask, depth, topk_index, parent, paths, tree.top_k, tree.num_heads)


def lookup(token_ids: Sequence[int], length: int, max_ngram: int = 3) -> tuple[list[int], int]:
    """Prompt-lookup decoding's guess: (the `length` tokens that followed the latest earlier
    occurrence of the longest suffix n-gram (n <= max_ngram) of `token_ids`, n); ([], 0) if none.

    Runs once per step on the host: candidate starts are the earlier positions of the last token
    (one C-level scan), and only those are compared further."""
    seq = token_ids if isinstance(token_ids, list) else list(token_ids)  # no copy per step
    last = seq[-1] if seq else None
    ends = [i for i, t in enumerate(seq[:-1]) if t == last]  # earlier occurrences of the last token
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for end in reversed(ends):
            if end - n + 1 >= 0 and seq[end - n + 1 : end + 1] == tail:
                return seq[end + 1 : end + 1 + length], n
    return [], 0


class LookupBranch:
    """A prompt-lookup guess as a chain of nodes under the tree's root, as long as its match is
    strong: the tokens that followed the latest earlier occurrence of the text's last n-gram (as
    HF's prompt-lookup decoding proposes), `max_length >> (max_ngram - n)` of them for an n-gram
    match (16 / 8 / 4 for 3 / 2 / 1-gram matches with `max_length` 16), no branch without one.

    Free of training, strong where answers copy the prompt or themselves; the tree's verification
    keeps whichever branch is right. The length follows n because longer matches are right for
    far longer (figures: eval/results/cpu-refactor-2026-12-03/README.md, "Figures that left the
    code"): a fixed-length chain wastes nodes on weak guesses and cuts strong ones.
    """

    def __init__(self, max_length: int, max_ngram: int = 3) -> None:
        if max_length < 1:
            raise ValueError(f"the lookup branch needs max_length >= 1, got {max_length}")
        self.max_length, self.max_ngram = max_length, max_ngram
        self._trees: tuple[TreeBuffers, dict[int, TreeBuffers]] | None = None

    def length_for(self, ngram: int) -> int:
        """Chain length after a suffix match of `ngram` tokens (0: no match)."""
        return self.max_length >> (self.max_ngram - ngram) if ngram > 0 else 0

    def guess(self, token_ids: Sequence[int]) -> list[int]:
        """The chain's tokens for text `token_ids` (ending with the root); [] for no branch."""
        tokens, ngram = lookup(token_ids, self.max_length, self.max_ngram)
        return tokens[: self.length_for(ngram)]

    def tree(self, tree: TreeBuffers, length: int) -> TreeBuffers:
        """`tree` with a chain of `length` nodes (built once per length while `tree` is current)."""
        if self._trees is None or self._trees[0] is not tree:
            self._trees = (tree, {})
        built = self._trees[1]
        if length not in built:
            built[length] = with_lookup_branch(tree, length)
        return built[length]
