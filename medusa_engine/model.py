"""What the decode loop needs from a model and its KV cache (two small protocols), and the
state the loop carries from one step to the next.

The loop (`generate.py`), the drafters and the static step see a model only through these;
`hf_adapter.HFModel` / `hf_adapter.KVSession` implement them over transformers, and nothing else
in the core imports transformers. The shape letters are the project's one legend (ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from attention.api import StaticMask
from attention.kv_cache import StaticKVCache
from attention.row_kv_cache import RowKVCache


@dataclass(frozen=True)
class DecodeState:
    """Between two steps: the base hidden state of the last token in the session's cache, and
    the base model's next token (the next tree's root, not yet in the cache)."""

    hidden_E: torch.Tensor
    root: int


class Session(Protocol):
    """A KV cache and the token ids whose keys/values it holds, in order (owned by the caller).

    A forward appends its T tokens' keys/values after the cached ones; `commit` then says which
    of them stay; `truncate` forgets a suffix. Nobody else edits `token_ids`.
    """

    token_ids: list[int]

    def __len__(self) -> int: ...

    @property
    def static(self) -> StaticKVCache | None:
        """The preallocated cache behind this session, if it has one (our attention backends)."""
        ...

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (cache rows and ids); a longer `length` keeps all."""
        ...

    def commit(self, past: int, tokens: Sequence[int], nodes: Sequence[int] | None = None) -> None:
        """After a forward over rows [past, ...): rows `past + nodes` (increasing, nodes[j] >= j;
        None: the rows as they are) become rows past .. past + len(tokens), holding `tokens`;
        everything after them is dropped."""
        ...


class CausalLM(Protocol):
    """A decoder with an LM head over an explicit KV cache (`Session`)."""

    attention: str  # "hf" or one of attention.api.BACKENDS
    hidden_size: int
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    name: str
    tokenizer: Any  # opaque to the loop; for the front ends that see text (CLI, chat, bench)

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    lm_head: torch.nn.Linear  # hidden_TE -> logits_TV (before any soft-capping)
    embed_tokens: torch.nn.Embedding  # ids_T -> embeddings_TE

    def new_session(self, capacity: int = ...) -> Session: ...

    def reserve(self, session: Session, tokens: int) -> None:
        """Make room for `tokens` tokens in the session's cache (a static cache grows)."""
        ...

    def check_fits(self, num_tokens: int) -> None:
        """Raise `ContextOverflowError` when `num_tokens` exceed the model's context."""
        ...

    def forward(
        self,
        input_ids_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        session: Session,
        block_mask_TT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_TE of T new tokens on top of the cache (appended to it); `block_mask_TT`
        ([i, j] = token i sees new token j) structures the new block, None is causal."""
        ...

    def forward_static(
        self,
        input_ids_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        session: Session,
        slots_T: torch.Tensor,
        mask: StaticMask,
    ) -> torch.Tensor:
        """`forward` with device-side bookkeeping only (a CUDA graph's body): keys/values go
        to `slots_T` of the session's static cache; host lengths and ids are not touched."""
        ...

    # ---- batched decoding (`batch.py`, `scheduler.py`) ----

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the keys and values of one token take in the cache."""
        ...

    def new_row_cache(self, rows: int, slots: int) -> RowKVCache:
        """A cache of independent rows, one sequence each (`RowKVCache`)."""
        ...

    def forward_rows(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        cache: RowKVCache,
        rows: range,
        block_mask_TT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_BTE of T new tokens in each of the cache rows `rows`, each appended after its
        row's valid slots; `block_mask_TT` ([T, T] or per row [B, T, T]) structures them,
        None is causal."""
        ...

    def logits(self, hidden_TE: torch.Tensor) -> torch.Tensor:
        """logits_TV, with the model's final soft-capping if it has one."""
        ...


class ContextOverflowError(ValueError):
    """A prompt (or conversation) longer than the model's context; one line for the CLI."""
