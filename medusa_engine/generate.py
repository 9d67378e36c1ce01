"""The decode loop: prefill, then repeat {heads propose, verify tree, accept, commit}.

Shape legend: E = hidden size, V = vocabulary, K = heads, N = tree nodes, P = paths.

Token ids in, token ids out: this module knows nothing about text. One step (Medusa, Alg. 1):

1. the drafter fills the tree from the hidden state of the last kept token: the root is the base
   model's own next token, deeper nodes the heads' top-k (Medusa heads: from that hidden state
   alone; recurrent heads: also from the tokens on the node's path; see `drafters.py`); with
   `lookup` > 0, a chain under the root holds a prompt-lookup guess when the text has one
   (`drafters.LookupBranch`: its length, up to `lookup`, follows the strength of the match);
2. one forward of the base model verifies all N nodes (tree mask + position ids over the cache);
3. the acceptance rule keeps the longest valid prefix of one path, plus the base model's next
   token after it (the bonus token, the next root);
4. the cache keeps exactly the kept path (one gather), and the kept tokens are emitted.

Each step emits `accepted + 1` tokens; τ (mean accepted length) is their mean over steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from medusa_engine.acceptance import accept
from medusa_engine.candidates import choose_token, path_tokens
from medusa_engine.config import SamplingConfig
from medusa_engine.drafters import Drafter, LookupBranch, make_drafter
from medusa_engine.dynamic_tree import DynamicTree, parse_dynamic
from medusa_engine.heads import AnyHeads, MedusaHeads
from medusa_engine.hf_adapter import HFModel, KVSession
from medusa_engine.recurrent_heads import RecurrentHeads
from medusa_engine.static_step import StaticStep
from medusa_engine.tree import TreeBuffers, build_tree, tree_from_name
from medusa_engine.trees import DEFAULT_TREE

log = logging.getLogger(__name__)


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


class MedusaGenerator:
    """Speculative decoding over an `HFModel` with Medusa heads (or any `Drafter`).

    Without a drafter (or with the `plain` tree) the same loop does plain decoding.
    """

    def __init__(
        self,
        model: HFModel,
        heads: AnyHeads | Drafter | None = None,
        tree: TreeBuffers | DynamicTree | str | Sequence[Sequence[int]] = DEFAULT_TREE,
        sampling: SamplingConfig | None = None,
        lookup: int = 0,
        static: bool = False,
    ) -> None:
        self.model = model
        self.sampling = sampling or SamplingConfig()
        if static and (lookup or model.attention == "hf" or not self.sampling.greedy):
            raise ValueError(
                "static (CUDA-graph) steps need greedy decoding, no lookup branch and one of our "
                "attention backends (sdpa, flex, triton, reference)"
            )
        # static: each verification step is a `StaticStep` (a CUDA graph on a GPU).
        self.static = static
        self._static_step: StaticStep | None = None
        self.drafter: Drafter | None = (
            make_drafter(heads, model)
            if isinstance(heads, (MedusaHeads, RecurrentHeads))
            else heads
        )
        # `lookup` > 0: a prompt-lookup branch of up to that many nodes under the tree's root.
        self.lookup = lookup
        self.lookup_branch = LookupBranch(lookup) if lookup > 0 else None
        self.tree: TreeBuffers | DynamicTree
        self.set_tree(tree)
        self.plain_tree = build_tree([], 0).to(model.device)
        self.generator = torch.Generator(device=model.device)
        if self.sampling.seed is not None:
            self.generator.manual_seed(self.sampling.seed)

    def set_tree(self, tree: TreeBuffers | DynamicTree | str | Sequence[Sequence[int]]) -> None:
        """Use a preset name (or `dynamic:N...`), a list of paths, built buffers or a
        `DynamicTree` from the next request on."""
        num_heads = self.drafter.num_heads if self.drafter is not None else 0
        if isinstance(tree, str):
            tree = parse_dynamic(tree) or tree_from_name(tree, num_heads)
        if isinstance(tree, DynamicTree):
            if self.static:
                raise ValueError("static (CUDA-graph) steps need a static tree, not a dynamic one")
            max_depth = self.drafter.max_depth if self.drafter is not None else 0
            self.tree = tree.for_heads(num_heads, max_depth)
            return
        if not isinstance(tree, TreeBuffers):
            tree = build_tree([tuple(p) for p in tree], num_heads)
        if tree.num_heads > num_heads:
            raise ValueError(f"tree is {tree.num_heads} deep but the drafter has {num_heads} heads")
        self.tree = tree.to(self.model.device)  # the drafter's (a lookup branch comes per step)

    # ---- public API -------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        session: KVSession | None = None,
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
        session: KVSession | None = None,
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
        hidden_E, token = self._prefill(prompt, session)
        result.prefill_s = time.perf_counter() - start
        out = result.token_ids
        chunk = [token]
        while True:
            chunk, reason = _truncate(chunk, out, max_new_tokens, eos)
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
            hidden_E, token, chunk = self._step(hidden_E, token, session)
            result.accepted_lengths.append(len(chunk))
        # The cache may hold kept tokens past an EOS or the token budget: drop them.
        self.model.keep(session, 0, None, min(len(session), len(prompt) + len(out) - 1))
        del session.token_ids[len(prompt) + len(out) - 1 :]
        result.finish_reason = reason
        result.total_s = time.perf_counter() - start

    # ---- steps ------------------------------------------------------------------------------

    def _prefill(self, prompt: list[int], session: KVSession) -> tuple[torch.Tensor, int]:
        """Feed what the session lacks of `prompt`; returns (hidden_E at the last token, root)."""
        common = 0
        limit = min(len(session), len(prompt) - 1)  # feed >= 1 token to get fresh logits
        while common < limit and session.token_ids[common] == prompt[common]:
            common += 1
        self.model.keep(session, 0, None, common)
        del session.token_ids[common:]
        device = self.model.device
        ids_T = torch.tensor(prompt[common:], dtype=torch.int64, device=device)
        pos_T = torch.arange(common, len(prompt), device=device)
        hidden_TE = self.model.forward(ids_T, pos_T, session)
        session.token_ids.extend(prompt[common:])
        hidden_E = hidden_TE[-1]
        root = choose_token(self.model.logits(hidden_E), self.sampling, self.generator)
        return hidden_E, int(root)

    @torch.inference_mode()
    def _step(
        self, hidden_E: torch.Tensor, root: int, session: KVSession
    ) -> tuple[torch.Tensor, int, list[int]]:
        """One verification step; returns (hidden_E, next root, emitted tokens)."""
        spec, past = self.tree, len(session)
        # Near the end of the context, finish one token at a time.
        near_end = past + max(spec.max_depth, self.lookup) + 1 > self.model.max_context
        if self.static and not near_end:
            step = self._static_for(session)
            chunk = step.run(hidden_E, root, past)
            session.token_ids.extend([root, *chunk[:-1]])
            return step.hidden_E, chunk[-1], chunk
        root_t = torch.tensor(root, device=self.model.device)
        tree = self.plain_tree if near_end or self.drafter is None else spec
        if isinstance(tree, DynamicTree):
            assert self.drafter is not None
            tree_tokens_N, tree = self.drafter.draft_dynamic(
                hidden_E, root_t, tree, session.token_ids
            )
        elif tree.num_nodes > 1 and self.drafter is not None:
            tree_tokens_N = self.drafter.draft(hidden_E, root_t, tree, session.token_ids)
        else:
            tree_tokens_N = root_t.reshape(1)
        if self.lookup_branch is not None and not near_end:
            guess = self.lookup_branch.guess([*session.token_ids, root])  # on the host
            if guess:
                tree = self.lookup_branch.tree(tree, len(guess))
                guess_G = torch.tensor(guess, dtype=tree_tokens_N.dtype, device=root_t.device)
                tree_tokens_N = torch.cat([tree_tokens_N, guess_G])
        candidates_PL = path_tokens(tree_tokens_N, tree)
        hidden_NE = self.model.forward(
            tree_tokens_N,
            tree.depth_N + past,
            session,
            block_mask_TT=tree.mask_NN if tree.num_nodes > 1 else None,
        )
        logits_NV = self.model.logits(hidden_NE)
        decision = accept(logits_NV, candidates_PL, tree.paths_PL, self.sampling, self.generator)
        # The best path's nodes and tokens travel with the decision: the step's one host sync.
        best_1 = decision[0:1]  # a 0-d index would be read on the host: a second sync
        row = torch.cat(
            [
                decision[1:],
                tree.paths_PL.index_select(0, best_1)[0],
                candidates_PL.index_select(0, best_1)[0],
            ]
        ).tolist()
        accepted, next_token, width = row[0], row[1], tree.paths_PL.shape[1]
        path = row[2 : 3 + accepted]
        kept = row[2 + width : 3 + width + accepted]
        self.model.keep(session, past, path, past + accepted + 1)
        session.token_ids.extend(kept)
        return hidden_NE[path[-1]], next_token, kept[1:] + [next_token]

    def _static_for(self, session: KVSession) -> StaticStep:
        """The static step of this session's cache and the current tree (rebuilt on change)."""
        step = self._static_step
        if (
            step is None
            or step.session is not session
            or step.cache is not session.cache.static  # reallocated to grow
            or step.source_tree is not self.tree
        ):
            assert isinstance(self.tree, TreeBuffers)  # set_tree refuses dynamic trees when static
            step = self._static_step = StaticStep(self.model, self.drafter, self.tree, session)
        return step


def _truncate(
    chunk: list[int], out: list[int], max_new_tokens: int, eos: set[int]
) -> tuple[list[int], str | None]:
    """Cut `chunk` at the first EOS (kept) or at the token budget; give the finish reason."""
    for i, token in enumerate(chunk):
        if len(out) + i + 1 >= max_new_tokens:
            return chunk[: i + 1], "eos" if token in eos else "length"
        if token in eos:
            return chunk[: i + 1], "eos"
    return chunk, None
