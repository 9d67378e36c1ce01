"""A static KV cache, preallocated per request, with tree compaction. Pure torch.

Shape legend: L layers, B batch, G key/value heads, S slots (the preallocated maximum length),
D head dim, Q new tokens of one forward, N tree nodes appended for verification, n accepted nodes.

One buffer per tensor kind, `keys_LBGSD` and `values_LBGSD`, allocated once from prompt length +
max new tokens + tree size (`StaticKVCache.for_request`). Every layer keeps its own length (a
Python int), because a forward appends to layer 0, then layer 1, ...: during a forward the lengths
differ, after it they agree. `length` is layer 0's, like `Cache.get_seq_length()` in transformers.

Tree verification (Medusa, Cai et al., 2024): the N tree nodes are appended at slots
[L, L + N) of every layer; once the accepted path `keep_idx` (node indices, ascending, root 0) is
known, `compact(tree_start=L, keep_idx)` moves those nodes to [L, L + n) with one gather over all
layers, keys and values. The cache then holds exactly what sequential decoding of the accepted
tokens would hold, because the positions (RoPE) of tree nodes are their depths, which equal
their positions on the accepted path.

No transformers here: `medusa_engine/hf_adapter.py` wraps this class as a transformers `Cache`.
For static-shape attention (`attention(..., kv_len=...)`) use `buffers(layer)` together with
`length_tensor`, a device tensor whose storage never changes.

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
    """Preallocated keys/values [L, B, G, S, D] with one host-side length per layer."""

    def __init__(self, keys_LBGSD: torch.Tensor, values_LBGSD: torch.Tensor) -> None:
        if keys_LBGSD.ndim != 5 or keys_LBGSD.shape != values_LBGSD.shape:
            raise ValueError(
                "expected keys and values [L, B, G, S, D] of one shape, got "
                f"{tuple(keys_LBGSD.shape)} and {tuple(values_LBGSD.shape)}"
            )
        if keys_LBGSD.dtype != values_LBGSD.dtype or keys_LBGSD.device != values_LBGSD.device:
            raise ValueError("keys and values must share dtype and device")
        self.keys_LBGSD = keys_LBGSD
        self.values_LBGSD = values_LBGSD
        self._lengths: list[int] = [0] * keys_LBGSD.shape[0]
        self._length_t = torch.zeros((), dtype=torch.int32, device=keys_LBGSD.device)

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

    @staticmethod
    def required_length(prompt_length: int, max_new_tokens: int, tree_size: int) -> int:
        """Slots needed by one request: prompt + max new tokens + one tree of `tree_size` nodes.

        Before a verification the cache holds < prompt + max_new_tokens tokens (else decoding
        has stopped); the tree adds at most `tree_size` slots on top.
        """
        if prompt_length < 1 or max_new_tokens < 0 or tree_size < 1:
            raise ValueError(
                f"need prompt_length >= 1, max_new_tokens >= 0, tree_size >= 1; got "
                f"{prompt_length}, {max_new_tokens}, {tree_size}"
            )
        return prompt_length + max_new_tokens + tree_size

    @classmethod
    def for_request(
        cls,
        *,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        prompt_length: int,
        max_new_tokens: int,
        tree_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> StaticKVCache:
        """`allocate` with `max_length = required_length(prompt, max_new_tokens, tree_size)`."""
        return cls.allocate(
            num_layers=num_layers,
            batch=batch,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_length=cls.required_length(prompt_length, max_new_tokens, tree_size),
            dtype=dtype,
            device=device,
        )

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.keys_LBGSD.shape[0]

    @property
    def max_length(self) -> int:
        return self.keys_LBGSD.shape[3]

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
        self, layer: int, k_new_BGQD: torch.Tensor, v_new_BGQD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write Q new tokens after layer `layer`'s valid prefix; return views k, v [B, G, K, D].

        K = previous length + Q. The returned tensors are views into the buffers (no copy):
        the full valid prefix, new tokens last, as `attention.api.attention` expects.
        Raises `CacheOverflowError` (nothing written) when K would exceed `max_length`.
        """
        keys_BGSD = self.keys_LBGSD[layer]
        expected = (*keys_BGSD.shape[:2], k_new_BGQD.shape[2], keys_BGSD.shape[3])
        if k_new_BGQD.shape != expected or v_new_BGQD.shape != expected:
            raise ValueError(
                f"layer {layer}: expected new k and v [B, G, Q, D] = {expected}, got "
                f"{tuple(k_new_BGQD.shape)} and {tuple(v_new_BGQD.shape)}"
            )
        start = self._lengths[layer]
        end = start + k_new_BGQD.shape[2]
        if end > self.max_length:
            raise CacheOverflowError(
                f"KV cache overflow at layer {layer}: {start} cached + {k_new_BGQD.shape[2]} new "
                f"tokens > {self.max_length} preallocated slots; allocate with a larger "
                "max_length (StaticKVCache.required_length(prompt, max_new_tokens, tree_size))"
            )
        keys_BGSD[:, :, start:end].copy_(k_new_BGQD)
        self.values_LBGSD[layer, :, :, start:end].copy_(v_new_BGQD)
        self._set_length(layer, end)
        return self.keys_LBGSD[layer, :, :, :end], self.values_LBGSD[layer, :, :, :end]

    def valid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views k, v [B, G, K, D] of layer `layer`'s valid prefix (K = its length)."""
        end = self._lengths[layer]
        return self.keys_LBGSD[layer, :, :, :end], self.values_LBGSD[layer, :, :, :end]

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views k, v [B, G, S, D] of all slots of layer `layer` (for static-shape attention).

        Use with `attention(..., kv_len=cache.length_tensor)`: once layer 0 has appended this
        forward's Q tokens, `length_tensor` is the valid length every layer attends over.
        """
        return self.keys_LBGSD[layer], self.values_LBGSD[layer]

    def write(
        self, layer: int, slots_Q: torch.Tensor, k_new_BGQD: torch.Tensor, v_new_BGQD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write Q new tokens at slots `slots_Q` (int64, on the cache's device); return buffers.

        No bounds check (it would read the slots on the host): the caller keeps the slots below
        `max_length`. Host lengths are left as they are. Returns `buffers(layer)`.
        """
        self.keys_LBGSD[layer].index_copy_(2, slots_Q, k_new_BGQD)
        self.values_LBGSD[layer].index_copy_(2, slots_Q, v_new_BGQD)
        return self.buffers(layer)

    def move(self, src_n: torch.Tensor, dst_n: torch.Tensor) -> None:
        """Copy slots `src_n` to slots `dst_n` (int64 device tensors) in every layer, keys and values.

        One gather and one scatter per buffer; the gather copies first, so the two sets may
        overlap. Host lengths are left as they are.
        """
        for buf_LBGSD in (self.keys_LBGSD, self.values_LBGSD):
            buf_LBGSD.index_copy_(3, dst_n, buf_LBGSD.index_select(3, src_n))

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

    def reset(self) -> None:
        self.crop(0)

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
        slots_n = keep_idx_n.to(self.keys_LBGSD.device) + tree_start
        dst = slice(tree_start, tree_start + n_keep)
        # index_select makes a copy first, so the overlapping in-place write is safe.
        for buf_LBGSD in (self.keys_LBGSD, self.values_LBGSD):
            buf_LBGSD[:, :, :, dst].copy_(buf_LBGSD.index_select(3, slots_n))
        for layer in range(self.num_layers):
            self._set_length(layer, tree_start + n_keep)
