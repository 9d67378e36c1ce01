"""KV sessions over transformers caches, and our attention as a transformers attention function.

Two caches, one `KVSession` (the `medusa_engine.model.Session` protocol) over either:

* `DynamicCache` (attention "hf": the model's own attention): compaction rewrites each layer's
  `keys` / `values` (one gather per layer), because `crop`'s argument changed meaning between
  transformers versions;
* `EngineCache` (our backends): a transformers `Cache` over `attention.kv_cache.StaticKVCache`.
  Its `update` writes nothing: `engine_attention` writes the new keys/values itself, as the
  forward's `ForwardPlan` (a keyword argument that transformers hands to the attention function)
  says: append after the valid prefix, or write at device-side slots (a CUDA-graph step); then
  attend over the valid prefix or, with a `StaticMask`, over the whole buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache

from attention.api import StaticMask, attention, attention_static
from attention.kv_cache import StaticKVCache
from attention.row_kv_cache import RowKVCache, RowWrite

ATTN_NAME = "medusa_engine"  # our entry in transformers' AttentionInterface


@dataclass(frozen=True)
class ForwardPlan:
    """How one forward uses the static cache (passed to every layer's attention call).

    `rows` set: a batch of rows of a `RowKVCache` (`forward_rows`): write each row's new tokens
    where it says, attend over its rows' first K slots masked by `static_mask` (per-row lengths).
    `slots_T` set: write the T new keys/values there, host lengths untouched (`forward_static`).
    `static_mask` set: attend over the whole buffer, masked by it (valid length on the device).
    Otherwise append and attend over the valid prefix with `backend`, `block_TT` structuring
    the new tokens (None: causal).
    """

    cache: StaticKVCache | None
    backend: str = "sdpa"
    block_TT: torch.Tensor | None = None
    static_mask: StaticMask | None = None
    slots_T: torch.Tensor | None = None
    rows: RowWrite | None = None


def engine_attention(
    module: Any,
    query_BHTD: torch.Tensor,
    key_BGTD: torch.Tensor,
    value_BGTD: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over `attention.api`: writes this layer's
    new keys/values (`key_BGTD`, `value_BGTD`) into the plan's cache, attends; out_BTHD."""
    if dropout:
        raise ValueError("the engine's attention is for inference: dropout must be 0")
    plan: ForwardPlan = kwargs["medusa_plan"]
    layer = module.layer_idx
    if plan.rows is not None:
        assert plan.static_mask is not None
        key_BGKD, value_BGKD = plan.rows.write(layer, key_BGTD, value_BGTD)
        out_BHTD = attention_static(query_BHTD, key_BGKD, value_BGKD, plan.static_mask, scaling)
        return out_BHTD.transpose(1, 2), None
    assert plan.cache is not None
    if plan.slots_T is not None:
        key_BGKD, value_BGKD = plan.cache.write(layer, plan.slots_T, key_BGTD, value_BGTD)
    else:
        key_BGKD, value_BGKD = plan.cache.append(layer, key_BGTD, value_BGTD)
        if plan.static_mask is not None:
            key_BGKD, value_BGKD = plan.cache.buffers(layer)
    window = kwargs.get("sliding_window")
    if window is not None and plan.cache.layer_length(layer) > window:
        raise NotImplementedError("sliding-window layers need attention='hf'")
    if plan.static_mask is not None:
        out_BHTD = attention_static(query_BHTD, key_BGKD, value_BGKD, plan.static_mask, scaling)
        return out_BHTD.transpose(1, 2), None
    causal = plan.block_TT is None and query_BHTD.shape[2] > 1
    out = attention(
        query_BHTD,
        key_BGKD,
        value_BGKD,
        backend="sdpa" if plan.backend == "flex" else plan.backend,  # flex: trees only
        causal=causal,
        tree_mask_QQ=plan.block_TT,
        scale=scaling,
    )
    assert isinstance(out, torch.Tensor)
    return out.transpose(1, 2), None


class RowsCache(Cache):
    """A transformers `Cache` over a `RowKVCache` (batched forwards); nothing to update here:
    `engine_attention` writes, and position ids are always given, so no length is asked for."""

    def __init__(self, rows: RowKVCache) -> None:
        super().__init__(layers=[])
        self.rows = rows

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # rows differ; transformers builds no mask for our attention function

    def __len__(self) -> int:
        return self.rows.num_layers


class EngineCache(Cache):
    """A transformers `Cache` over `StaticKVCache`; `engine_attention` does the writing."""

    def __init__(self, static: StaticKVCache) -> None:
        super().__init__(layers=[])
        self.static = static

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states  # written by engine_attention, as the ForwardPlan says

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.static.layer_length(layer_idx)

    def __len__(self) -> int:
        return self.static.num_layers


@dataclass
class KVSession:
    """`Session` over a transformers cache: a `DynamicCache` or an `EngineCache`."""

    cache: Any
    device: torch.device
    token_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def static(self) -> StaticKVCache | None:
        return self.cache.static if isinstance(self.cache, EngineCache) else None

    def truncate(self, length: int) -> None:
        length = min(length, len(self.token_ids))
        self._keep(0, None, length)
        del self.token_ids[length:]

    def commit(self, past: int, tokens: Sequence[int], nodes: Sequence[int] | None = None) -> None:
        if nodes is not None and len(nodes) != len(tokens):
            raise ValueError(f"{len(nodes)} nodes kept for {len(tokens)} tokens")
        if nodes is not None and list(nodes) == list(range(len(nodes))):
            nodes = None  # already in place
        self._keep(past, nodes, past + len(tokens))
        self.token_ids[past:] = tokens

    @torch.inference_mode()
    def _keep(self, start: int, nodes: Sequence[int] | None, length: int) -> None:
        """Rows start + nodes move to start.. (increasing, nodes[j] >= j: the gather reads rows
        at or after the ones it writes); then the cache is `length` rows long."""
        gather = None if nodes is None else torch.as_tensor(nodes, device=self.device)
        if isinstance(self.cache, EngineCache):
            static = self.cache.static
            if gather is not None:
                static.compact(start, gather, validate=False)
            static.set_length(length)  # a static step grew it on the device
            return
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", True) or layer.keys is None:
                continue
            if gather is not None:
                rows = gather + start
                n = rows.shape[0]
                layer.keys[..., start : start + n, :] = layer.keys.index_select(-2, rows)
                layer.values[..., start : start + n, :] = layer.values.index_select(-2, rows)
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
