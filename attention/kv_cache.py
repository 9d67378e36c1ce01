"""A static KV cache, preallocated per request, with tree compaction. Pure torch.

Shape legend: B batch, G key/value heads, S slots (the preallocated maximum length), D head dim,
T new tokens of one forward, K keys of a layer's valid prefix (previous length + T), N tree nodes
appended for verification, n accepted nodes. The layer axis has no letter: `keys` and `values`
are [layers, B, G, S, D].

One buffer per tensor kind, `keys` and `values`, allocated once (`StaticKVCache.allocate`); a
caller that needs more slots allocates a bigger cache and appends the valid prefix to it. Every
layer keeps its own length (a Python int), because a forward appends to layer 0, then layer 1,
...: during a forward the lengths differ, after it they agree. `length` is layer 0's, like
`Cache.get_seq_length()` in transformers.

Tree verification (Medusa, Cai et al., 2024): the N tree nodes are appended at slots
[tree_start, tree_start + N) of every layer; once the accepted path `keep_idx` (node indices,
ascending, root 0) is known, `compact(tree_start, keep_idx)` moves those nodes to
[tree_start, tree_start + n) with one gather over all layers, keys and values. The cache then
holds exactly what sequential decoding of the accepted tokens would hold, because the positions
(RoPE) of tree nodes are their depths, which equal their positions on the accepted path.

No transformers here: `medusa_engine/hf_adapter/cache.py` wraps this class as a transformers
`Cache`. For static-shape attention (`attention(..., kv_len=...)`) use `buffers(layer)` together
with `length_tensor`, a device tensor whose storage never changes.

Device-side bookkeeping (a step captured in a CUDA graph, `medusa_engine/static_step.py`):
`write` puts new keys at slots given as a device tensor and `move` copies slots to slots, neither
reading nor changing the host lengths; the caller tracks the length and sets it with
`set_length` when it hands the cache back to host-side code.
"""

from __future__ import annotations

from itertools import pairwise

import torch


class CacheOverflowError(ValueError):
    """Appending would write past the preallocated slots."""


class StaticKVCache:
    """Preallocated keys/values [layers, B, G, S, D] with one host-side length per layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.ndim != 5 or keys.shape != values.shape:
            raise ValueError(
                "expected keys and values [layers, B, G, S, D] of one shape, got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if keys.dtype != values.dtype or keys.device != values.device:
            raise ValueError("keys and values must share dtype and device")
        self.keys = keys
        self.values = values
        self._lengths: list[int] = [0] * keys.shape[0]
        self._length_t = torch.zeros((), dtype=torch.int32, device=keys.device)

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> StaticKVCache:
        """An empty cache of `max_length` slots (zero-filled, so unused slots are finite)."""
        if min(num_layers, batch, kv_heads, head_dim, max_length) < 1:
            raise ValueError(
                f"every size must be >= 1: layers={num_layers} batch={batch} "
                f"kv_heads={kv_heads} head_dim={head_dim} max_length={max_length}"
            )
        shape = (num_layers, batch, kv_heads, max_length, head_dim)
        keys = torch.zeros(shape, dtype=dtype, device=device)
        return cls(keys, torch.zeros_like(keys))

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def length(self) -> int:
        """Tokens held by layer 0 (all layers agree between forwards)."""
        return self._lengths[0]

    def layer_length(self, layer: int) -> int:
        return self._lengths[layer]

    @property
    def length_tensor(self) -> torch.Tensor:
        """int32 [] on the cache's device holding `length`; always the same storage.

        Updated in place whenever layer 0's length changes (one `fill_` per forward, no host
        sync), so a reference taken once (a CUDA graph's input, say) stays current.
        """
        return self._length_t

    def _set_length(self, layer: int, value: int) -> None:
        self._lengths[layer] = value
        if layer == 0:
            self._length_t.fill_(value)

    # ---- per-layer access ----------------------------------------------------------------------

    def append(
        self, layer: int, k_new_BGTD: torch.Tensor, v_new_BGTD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new tokens after layer `layer`'s valid prefix; return views k, v [B, G, K, D].

        K = previous length + T. The returned tensors are views into the buffers (no copy):
        the full valid prefix, new tokens last, as `attention.api.attention` expects.
        Raises `CacheOverflowError` (nothing written) when K would exceed `max_length`.
        """
        keys_BGSD = self.keys[layer]
        expected = (*keys_BGSD.shape[:2], k_new_BGTD.shape[2], keys_BGSD.shape[3])
        if k_new_BGTD.shape != expected or v_new_BGTD.shape != expected:
            raise ValueError(
                f"layer {layer}: expected new k and v [B, G, T, D] = {expected}, got "
                f"{tuple(k_new_BGTD.shape)} and {tuple(v_new_BGTD.shape)}"
            )
        start = self._lengths[layer]
        end = start + k_new_BGTD.shape[2]
        if end > self.max_length:
            raise CacheOverflowError(
                f"KV cache overflow at layer {layer}: {start} cached + {k_new_BGTD.shape[2]} new "
                f"tokens > {self.max_length} preallocated slots; allocate with a larger "
                "max_length"
            )
        keys_BGSD[:, :, start:end].copy_(k_new_BGTD)
        self.values[layer, :, :, start:end].copy_(v_new_BGTD)
        self._set_length(layer, end)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def valid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views k, v [B, G, K, D] of layer `layer`'s valid prefix (K = its length)."""
        end = self._lengths[layer]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views k, v [B, G, S, D] of all slots of layer `layer` (for static-shape attention).

        Use with `attention(..., kv_len=cache.length_tensor)`: once layer 0 has appended this
        forward's T tokens, `length_tensor` is the valid length every layer attends over.
        """
        return self.keys[layer], self.values[layer]

    def write(
        self, layer: int, slots_T: torch.Tensor, k_new_BGTD: torch.Tensor, v_new_BGTD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new tokens at slots `slots_T` (int64, on the cache's device); return buffers.

        No bounds check (it would read the slots on the host): the caller keeps the slots below
        `max_length`. Host lengths are left as they are. Returns `buffers(layer)`.
        """
        self.keys[layer].index_copy_(2, slots_T, k_new_BGTD)
        self.values[layer].index_copy_(2, slots_T, v_new_BGTD)
        return self.buffers(layer)

    def move(self, src_n: torch.Tensor, dst_n: torch.Tensor) -> None:
        """Copy slots `src_n` to `dst_n` (int64 device tensors) in every layer, keys and values.

        One gather and one scatter per buffer; the gather copies first, so the two sets may
        overlap. Host lengths are left as they are.
        """
        for buf in (self.keys, self.values):  # [layers, B, G, S, D]: dim 3 is the slots
            buf.index_copy_(3, dst_n, buf.index_select(3, src_n))

    def set_length(self, length: int) -> None:
        """Declare the first `length` slots of every layer valid (after device-side steps)."""
        if not 0 <= length <= self.max_length:
            raise ValueError(f"length {length} is outside [0, {self.max_length}]")
        for layer in range(self.num_layers):
            self._set_length(layer, length)

    # ---- whole-cache edits -------------------------------------------------------------------

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens of every layer (slots past it are left as they are)."""
        if not 0 <= length <= min(self._lengths):
            raise ValueError(f"cannot crop to {length}: layer lengths are {self._lengths}")
        for layer in range(self.num_layers):
            self._set_length(layer, length)

    def compact(self, tree_start: int, keep_idx_n: torch.Tensor, *, validate: bool = True) -> None:
        """Keep the accepted tree nodes `keep_idx_n` of the N nodes at [tree_start, length).

        `keep_idx_n` (int64 [n] on any device, strictly ascending, in [0, N); for Medusa the
        accepted root-to-node path, so it starts at 0) selects the nodes to keep; after the call
        slots [tree_start, tree_start + n) hold them in order, for every layer, keys and values,
        and every length is tree_start + n. One gather (`index_select`) per buffer moves them.
        `validate=False` skips the value checks, which read keep_idx on the host.
        """
        if len(set(self._lengths)) != 1:
            raise ValueError(f"compact between forwards only; layer lengths are {self._lengths}")
        n_nodes = self.length - tree_start
        if not 0 <= tree_start <= self.length:
            raise ValueError(
                f"tree_start {tree_start} is not within the {self.length} cached tokens"
            )
        if keep_idx_n.ndim != 1 or keep_idx_n.dtype != torch.int64:
            raise ValueError(
                f"keep_idx must be int64 [n], got {keep_idx_n.dtype} {keep_idx_n.shape}"
            )
        n_keep = keep_idx_n.shape[0]
        if validate and n_keep > 0:
            idx = keep_idx_n.tolist()
            if idx[0] < 0 or idx[-1] >= n_nodes or any(a >= b for a, b in pairwise(idx)):
                raise ValueError(
                    f"keep_idx {idx} must be strictly ascending within the {n_nodes} tree nodes"
                )
        slots_n = keep_idx_n.to(self.keys.device) + tree_start
        dst = slice(tree_start, tree_start + n_keep)
        # index_select makes a copy first, so the overlapping in-place write is safe.
        for buf in (self.keys, self.values):  # [layers, B, G, S, D]
            buf[:, :, :, dst].copy_(buf.index_select(3, slots_n))
        for layer in range(self.num_layers):
            self._set_length(layer, tree_start + n_keep)
