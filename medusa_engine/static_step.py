"""One greedy verification step with static shapes and no host sync: a CUDA graph on a GPU.

Shape legend (ARCHITECTURE.md): E hidden size, N tree nodes, P root-to-leaf paths, L path
length (max depth + 1), S cache slots.

The step's state lives in device tensors whose storage never changes: `length_t` (tokens in the
KV cache), `root_t` (the base model's next token, not yet in the cache) and `hidden_E` (the base
hidden state of the last kept token). One step, all on the device:

1. the drafter fills the tree from (hidden_E, root_t) (a drafter that reads the text on the host,
   like the prompt-lookup branch, cannot take part);
2. `HFModel.forward_static` writes the N nodes' keys/values at slots length + [0, N) and verifies
   them with the tree mask over the whole buffer, the valid length length + N read from the device;
3. `accept_greedy` picks the path and its accepted length a;
4. the path's L slots move to length + [0, L) in one gather (fixed L: the slots past the a + 1
   kept ones lie beyond the new length and are never read); `emitted_L` holds the a accepted
   tokens then the bonus token, `count_t` = a + 1; the state advances in place.

On CUDA the step is captured once per (cache buffer, tree) and replayed; the host then reads
(count, emitted) in one transfer, outside the graph: the one sync per step that streaming needs.
Elsewhere the same code runs eagerly (so CPU tests check exactly what the graph replays).
"""

from __future__ import annotations

import torch

from attention.api import prepare_static
from attention.masks import tree_bitmask_QW
from medusa_engine.acceptance import accept_greedy
from medusa_engine.candidates import path_tokens
from medusa_engine.drafters import Drafter
from medusa_engine.model import CausalLM, DecodeState, Session
from medusa_engine.tree import TreeBuffers


class StaticStep:
    """Greedy verification steps over one session's static cache with one fixed tree."""

    def __init__(
        self,
        model: CausalLM,
        drafter: Drafter | None,
        tree: TreeBuffers,
        session: Session,
        *,
        graph: bool | None = None,
    ) -> None:
        if session.static is None:
            raise ValueError(
                "a static step needs a static cache: one of our attention backends "
                "(--attention sdpa, flex, triton or reference)"
            )
        if tree.num_nodes > 1 and drafter is None:
            raise ValueError("a tree of more than one node needs a drafter")
        device = model.device
        self.model, self.drafter, self.session = model, drafter, session
        self.source_tree = tree  # as given (`serves` compares identity)
        self.tree = tree.to(device)
        self.cache = session.static
        n, width = tree.num_nodes, tree.max_depth + 1
        self.length_t = torch.zeros((), dtype=torch.int64, device=device)
        self.root_t = torch.zeros((), dtype=torch.int64, device=device)
        self.hidden_E = torch.zeros(model.hidden_size, dtype=model.dtype, device=device)
        self.emitted_L = torch.zeros(width, dtype=torch.int64, device=device)
        self.count_t = torch.zeros((), dtype=torch.int64, device=device)
        self._nodes_N = torch.arange(n, device=device)
        self._width_L = torch.arange(width, device=device)
        self._tree_QQ = self.tree.mask_NN if n > 1 else None
        self._bits_QW = (
            tree_bitmask_QW(self._tree_QQ)
            if model.attention == "triton" and self._tree_QQ is not None
            else None
        )
        self.use_graph = device.type == "cuda" if graph is None else graph
        self._graph: torch.cuda.CUDAGraph | None = None

    def serves(self, session: Session, tree: object) -> bool:
        """Whether this step runs `tree` over `session`'s current cache buffer."""
        return session is self.session and session.static is self.cache and tree is self.source_tree

    @torch.inference_mode()
    def compute(self) -> None:
        """The step itself: reads and advances the state tensors; device work only."""
        tree, start = self.tree, self.length_t
        if tree.num_nodes > 1:
            assert self.drafter is not None
            tokens_N = self.drafter.draft(self.hidden_E, self.root_t, tree, ())
        else:
            tokens_N = self.root_t.reshape(1)
        candidates_PL = path_tokens(tokens_N, tree)
        kv_len_B = (start + tree.num_nodes).to(torch.int32).reshape(1)
        mask = prepare_static(
            self.model.attention,
            tree.num_nodes,
            self.cache.max_length,
            kv_len_B,
            tree_mask_QQ=self._tree_QQ,
            tree_bits_QW=self._bits_QW,
        )
        hidden_NE = self.model.forward_static(
            tokens_N, start + tree.depth_N, self.session, start + self._nodes_N, mask
        )
        decision = accept_greedy(self.model.logits(hidden_NE), candidates_PL, tree.paths_PL)
        # Index with 1-element tensors only: a 0-d tensor index is read on the host (a sync).
        best_1, accepted_1, next_1 = decision[0:1], decision[1:2], decision[2:3]
        path_L = tree.paths_PL.index_select(0, best_1)[0]
        self.cache.move(start + path_L.clamp(min=0), start + self._width_L)
        emitted_L = torch.cat([candidates_PL.index_select(0, best_1)[0, 1:], next_1])
        self.emitted_L.copy_(emitted_L.scatter(0, accepted_1, next_1))
        self.count_t.copy_(accepted_1[0] + 1)
        self.hidden_E.copy_(hidden_NE.index_select(0, path_L.gather(0, accepted_1))[0])
        self.root_t.copy_(next_1[0])
        self.length_t.add_(accepted_1[0] + 1)

    def _capture(self, hidden_E: torch.Tensor, root: int, length: int) -> None:
        """Record `compute` in a CUDA graph (after two warm-up runs on a side stream).

        Each warm-up starts from the caller's state, so it writes keys/values only in the slots
        the real step will write (past the valid length); the caller loads the state again
        before replaying, so capturing changes nothing the caller keeps.
        """
        hidden_E = hidden_E.clone()  # the warm-ups overwrite self.hidden_E, which it may be
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.load(hidden_E, root, length)
                self.compute()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.compute()
        self._graph = graph

    def load(self, hidden_E: torch.Tensor, root: int, length: int) -> None:
        """Set the state (no sync: small copies from host values)."""
        if hidden_E.data_ptr() != self.hidden_E.data_ptr():
            self.hidden_E.copy_(hidden_E)
        self.root_t.fill_(root)
        self.length_t.fill_(length)

    def run(self, state: DecodeState) -> tuple[DecodeState, list[int]]:
        """One step from `state` over the session's cache; returns the next state and the
        emitted tokens (the accepted candidates, then the bonus token, the next root), which the
        session commits. The next hidden state is `self.hidden_E` (overwritten by the next step).
        One host sync (the read of the emitted tokens).
        """
        length = len(self.session)
        if length + self.tree.num_nodes > self.cache.max_length:
            raise ValueError(
                f"the cache has {self.cache.max_length} slots; a {self.tree.num_nodes}-node step "
                f"at length {length} needs more (allocate prompt + new tokens + tree)"
            )
        if self.session.static is not self.cache:
            raise ValueError("the session's cache was reallocated: build a new StaticStep")
        if self.use_graph and self._graph is None:
            self._capture(state.hidden_E, state.root, length)
        self.load(state.hidden_E, state.root, length)
        if self._graph is not None:
            self._graph.replay()
        else:
            self.compute()
        row = torch.cat([self.count_t.reshape(1), self.emitted_L]).tolist()
        emitted = row[1 : 1 + row[0]]
        self.session.commit(length, [state.root, *emitted[:-1]])  # rows already in place
        return DecodeState(self.hidden_E, emitted[-1]), emitted
