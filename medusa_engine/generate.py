"""The decode loop: prefill, then repeat propose -> verify -> accept -> commit.

Shape legend (ARCHITECTURE.md): E hidden size, V vocabulary, N tree nodes, P root-to-leaf paths,
L path length.

Token ids in, token ids out: this module knows nothing about text or transformers (the model is a
`medusa_engine.model.CausalLM`). One step (Medusa, Alg. 1):

1. propose: the drafter fills the tree from the hidden state of the last kept token; the root is
   the base model's own next token (`drafters.py`); a dynamic tree is shaped by the drafter's
   confidence (`dynamic_tree.py`); with `lookup` > 0 a chain under the root holds a
   prompt-lookup guess when the text has one (`drafters.LookupBranch`);
2. verify: one forward of the base model over all N nodes (tree mask + position ids on the cache);
3. accept: the acceptance rule keeps the longest valid prefix of one path, plus the base model's
   next token after it (the bonus token, the next root), read on the host once (`Decision`);
4. commit: the session keeps exactly the kept path (one gather) and its tokens.

Each step emits `accepted + 1` tokens; τ (mean accepted length) is their mean over steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import torch

from medusa_engine.acceptance import Decision, decide
from medusa_engine.candidates import path_tokens
from medusa_engine.config import SamplingConfig
from medusa_engine.drafters import Drafter, LookupBranch
from medusa_engine.dynamic_tree import DynamicTree
from medusa_engine.model import CausalLM, DecodeState, Session
from medusa_engine.sampling import choose_token
from medusa_engine.static_step import StaticStep
from medusa_engine.tree import TreeBuffers, build_tree
from medusa_engine.tree_spec import parse_tree

Tree = TreeBuffers | DynamicTree


@dataclass
class GenerationResult:
    """What one request produced; `accepted_lengths[s]` = tokens emitted by verify step s."""

    token_ids: list[int] = field(default_factory=list)
    accepted_lengths: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prefill_s: float = 0.0
    total_s: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.accepted_lengths)

    @property
    def mean_accepted(self) -> float:
        """τ: tokens per verification forward (the prefill's first token is not counted)."""
        return sum(self.accepted_lengths) / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class Proposal:
    """A step's tree (a dynamic one already shaped) and the tokens of its N nodes."""

    tree: TreeBuffers
    tokens_N: torch.Tensor


class MedusaGenerator:
    """Speculative decoding over a `CausalLM` with a `Drafter` (None: plain decoding).

    Takes resolved objects only: a drafter (`drafters.make_drafter`) and a tree
    (`tree_spec.parse_tree`); `engine.build_engine` / `engine.load_engine` make them from specs.
    `static`: greedy steps with static shapes and device-side bookkeeping (`StaticStep`: a CUDA
    graph on a GPU); needs a static tree, no lookup branch and a model with a static cache.
    """

    def __init__(
        self,
        model: CausalLM,
        drafter: Drafter | None,
        tree: Tree,
        sampling: SamplingConfig | None = None,
        lookup: int = 0,
        static: bool = False,
    ) -> None:
        self.model = model
        self.drafter = drafter
        self.sampling = sampling or SamplingConfig()
        if static and (lookup or not self.sampling.greedy):
            raise ValueError("static steps need greedy decoding and no lookup branch")
        self.static = static
        self._static_step: StaticStep | None = None
        self.lookup = lookup
        self.lookup_branch = LookupBranch(lookup) if lookup > 0 else None
        self.plain_tree = build_tree([], 0).to(model.device)
        self.tree: Tree = self.plain_tree
        self.set_tree(tree)
        self.generator = torch.Generator(device=model.device)
        if self.sampling.seed is not None:
            self.generator.manual_seed(self.sampling.seed)

    def set_tree(self, tree: Tree) -> None:
        """Verify `tree` from the next step; it is checked against the drafter as
        `tree_spec.parse_tree` checks every tree (a no-op for a tree it resolved)."""
        if self.static and isinstance(tree, DynamicTree):
            raise ValueError("static steps need a static tree, not a dynamic one")
        tree = parse_tree(tree, self.drafter)
        self.tree = tree.to(self.model.device) if isinstance(tree, TreeBuffers) else tree

    # ---- requests ---------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        session: Session | None = None,
        eos_token_ids: Sequence[int] | None = None,
        stop: Callable[[Sequence[int]], bool] | None = None,
    ) -> GenerationResult:
        """Run to completion; see `stream` for the arguments."""
        result = GenerationResult()
        for _ in self.stream(
            prompt_ids,
            max_new_tokens,
            session=session,
            eos_token_ids=eos_token_ids,
            stop=stop,
            result=result,
        ):
            pass
        return result

    def stream(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        session: Session | None = None,
        eos_token_ids: Sequence[int] | None = None,
        stop: Callable[[Sequence[int]], bool] | None = None,
        result: GenerationResult | None = None,
    ) -> Iterator[list[int]]:
        """Yield new tokens as they are accepted (one list per step, prefill first).

        `session`: a KV cache to reuse; the longest common prefix of its tokens and `prompt_ids`
        is kept and only the rest is prefilled. Afterwards it holds the prompt and the new tokens
        (all but the last, whose K/V the next request computes). `eos_token_ids` defaults to the
        model's; generation stops after an EOS token. `stop(new_tokens)` is asked after each
        step; True ends generation (finish reason "stop"). `result` is filled as tokens come.
        """
        result = result if result is not None else GenerationResult()
        eos = set(self.model.eos_token_ids if eos_token_ids is None else eos_token_ids)
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        self.model.check_fits(len(prompt))
        if max_new_tokens <= 0:
            result.finish_reason = "length"
            return
        # A static cache is sized for this request (prompt + budget + one tree), not the context.
        needed = len(prompt) + max_new_tokens + self.tree.num_nodes + self.lookup
        needed = min(needed, self.model.max_context)
        if session is None:
            session = self.model.new_session(needed)
        self.model.reserve(session, needed)

        start = time.perf_counter()
        state = self.prefill(prompt, session)
        result.prefill_s = time.perf_counter() - start
        out = result.token_ids
        chunk = [state.root]
        while True:
            chunk, reason = cut_at_finish(chunk, out, max_new_tokens, eos)
            out.extend(chunk)
            result.total_s = time.perf_counter() - start
            if chunk:
                yield chunk
            if reason is None and stop is not None and stop(out):
                reason = "stop"
            if reason is None and len(session) + 1 > self.model.max_context:
                reason = "context"
            if reason is not None:
                break
            state, chunk = self.step(state, session)
            result.accepted_lengths.append(len(chunk))
        # The cache may hold kept tokens past an EOS or the token budget: drop them.
        session.truncate(len(prompt) + len(out) - 1)
        result.finish_reason = reason
        result.total_s = time.perf_counter() - start

    # ---- steps ------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompt: Sequence[int], session: Session) -> DecodeState:
        """Feed what the session lacks of `prompt` (>= 1 token, for fresh logits)."""
        common, limit = 0, min(len(session), len(prompt) - 1)
        while common < limit and session.token_ids[common] == prompt[common]:
            common += 1
        session.truncate(common)
        device = self.model.device
        ids_T = torch.tensor(prompt[common:], dtype=torch.int64, device=device)
        pos_T = torch.arange(common, len(prompt), device=device)
        hidden_TE = self.model.forward(ids_T, pos_T, session)
        session.commit(common, prompt[common:])
        self._committed(session, common, None)
        root = choose_token(self.model.logits(hidden_TE[-1]), self.sampling, self.generator)
        return DecodeState(hidden_TE[-1], int(root))

    @torch.inference_mode()
    def step(self, state: DecodeState, session: Session) -> tuple[DecodeState, list[int]]:
        """One verification step; returns the next state and the emitted tokens."""
        past = len(session)
        near_end = self.near_end(past)
        if self.static and not near_end:
            return self._static_for(session).run(state)
        proposal = self.propose(state, session.token_ids, near_end)
        hidden_NE = self.verify(proposal, session, past)
        decision = self.accept(hidden_NE, proposal)
        session.commit(past, decision.tokens, decision.nodes)
        self._committed(session, past, decision.nodes)
        return DecodeState(hidden_NE[decision.nodes[-1]], decision.next_token), decision.emitted

    def _committed(self, session: Session, past: int, nodes: Sequence[int] | None) -> None:
        """Tell a stateful drafter (EAGLE-3's draft cache) which rows of the forward stayed."""
        on_commit = getattr(self.drafter, "on_commit", None)
        if on_commit is not None:
            on_commit(session.token_ids, past, nodes)

    def propose(
        self, state: DecodeState, token_ids: Sequence[int], near_end: bool = False
    ) -> Proposal:
        """The step's tree and its tokens: the drafter's (plain near the context's end), plus
        the lookup branch when the text has a match. `token_ids`: the sequence so far (the
        session's), without the root."""
        root_t = torch.tensor(state.root, device=self.model.device)
        tree = self.plain_tree if near_end or self.drafter is None else self.tree
        if isinstance(tree, DynamicTree):
            assert self.drafter is not None
            tokens_N, tree = self.drafter.draft_dynamic(state.hidden_E, root_t, tree, token_ids)
        elif tree.num_nodes > 1:
            assert self.drafter is not None
            tokens_N = self.drafter.draft(state.hidden_E, root_t, tree, token_ids)
        else:
            tokens_N = root_t.reshape(1)
        proposal = Proposal(tree, tokens_N)
        return proposal if near_end else self.add_lookup(proposal, token_ids, state.root)

    def add_lookup(self, proposal: Proposal, token_ids: Sequence[int], root: int) -> Proposal:
        """`proposal` with the lookup branch under its root when the text has a match."""
        if self.lookup_branch is None:
            return proposal
        guess = self.lookup_branch.guess([*token_ids, root])  # on the host
        if not guess:
            return proposal
        tokens_N = proposal.tokens_N
        guess_G = torch.tensor(guess, dtype=tokens_N.dtype, device=tokens_N.device)
        tree = self.lookup_branch.tree(proposal.tree, len(guess))
        return Proposal(tree, torch.cat([tokens_N, guess_G]))

    def verify(self, proposal: Proposal, session: Session, past: int) -> torch.Tensor:
        """hidden_NE of the tree's nodes: one forward at positions past + depth."""
        tree = proposal.tree
        mask_NN = tree.mask_NN if tree.num_nodes > 1 else None
        return self.model.forward(proposal.tokens_N, tree.depth_N + past, session, mask_NN)

    def accept(
        self,
        hidden_NE: torch.Tensor,
        proposal: Proposal,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> Decision:
        """The acceptance rule on the verified tree: the engine's sampling config and generator,
        or a request's own (batched decoding)."""
        tree = proposal.tree
        return decide(
            self.model.logits(hidden_NE),
            path_tokens(proposal.tokens_N, tree),
            tree.paths_PL,
            sampling or self.sampling,
            generator or self.generator,
        )

    def near_end(self, past: int) -> bool:
        """Near the end of the context the loop finishes one token at a time."""
        return past + max(self.tree.max_depth, self.lookup) + 1 > self.model.max_context

    def _static_for(self, session: Session) -> StaticStep:
        """The static step of this session's cache and the current tree (rebuilt on change)."""
        step = self._static_step
        if step is None or not step.serves(session, self.tree):
            assert isinstance(self.tree, TreeBuffers)  # set_tree refuses dynamic trees when static
            step = self._static_step = StaticStep(self.model, self.drafter, self.tree, session)
        return step


def cut_at_finish(
    chunk: list[int], out: list[int], max_new_tokens: int, eos: AbstractSet[int]
) -> tuple[list[int], str | None]:
    """Cut `chunk` at the first EOS (kept) or at the token budget; give the finish reason."""
    for i, token in enumerate(chunk):
        if len(out) + i + 1 >= max_new_tokens:
            return chunk[: i + 1], "eos" if token in eos else "length"
        if token in eos:
            return chunk[: i + 1], "eos"
    return chunk, None
