"""A KV cache of independent rows, one sequence each, with one length per row. Pure torch.

Shape legend: R rows allocated, B rows of one forward (a contiguous range of rows), G key/value
heads, S slots per row, D head dim, T new tokens per row in one forward, K keys one forward
attends (the longest of its rows after the write), n kept nodes per row. `keys` and `values` are
[layers, R, G, S, D].

This is the batched engine's cache (continuous batching): row r holds one request's keys and
values in slots [0, lengths[r]), independently of its neighbours. One forward over rows
[r0, r1):

1. `begin(rows, T)` appends T slots to every row at once (on the host) and returns a `RowWrite`:
   the slots each row's new tokens go to and the valid length per row after them, as tensors,
   computed once and shared by every layer;
2. each layer writes its T new keys/values per row with one `index_put_` (`RowWrite.write`) and
   attends over the first K slots of its rows, each row masked to its own valid length
   (`attention.api.prepare_static` with `kv_len_B`): a row shorter than K sees none of the
   slots past its own end;
3. `compact` keeps each row's accepted tree nodes with one gather and one scatter for all rows.

Rows are the unit of memory: `free` empties one at once, `move_row` packs a live row into a
freed one (a scheduler keeps its rows contiguous so that a forward reads plain views, no copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention.kv_cache import CacheOverflowError


@dataclass(frozen=True)
class RowWrite:
    """Where one forward's T new tokens go in rows [r0, r1) (shared by all its layers)."""

    cache: RowKVCache
    r0: int
    r1: int
    rows_BT: torch.Tensor  # int64: the cache row of each new token
    slots_BT: torch.Tensor  # int64: its slot
    kv_len_B: torch.Tensor  # int32: each row's valid length after the write
    k_len: int  # K: keys attended (the longest row after the write)

    def write(
        self, layer: int, k_new_BGTD: torch.Tensor, v_new_BGTD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys/values; return views k, v [B, G, K, D] of the rows."""
        keys = self.cache.keys[layer]  # [R, G, S, D]
        values = self.cache.values[layer]
        # Advanced indices on dims 0 and 2 put their [B, T] first: the value is [B, T, G, D].
        keys[self.rows_BT, :, self.slots_BT] = k_new_BGTD.transpose(1, 2)
        values[self.rows_BT, :, self.slots_BT] = v_new_BGTD.transpose(1, 2)
        return keys[self.r0 : self.r1, :, : self.k_len], values[self.r0 : self.r1, :, : self.k_len]


class RowKVCache:
    """Preallocated keys/values [layers, R, G, S, D] with one host-side length per row."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.ndim != 5 or keys.shape != values.shape:
            raise ValueError(
                "expected keys and values [layers, R, G, S, D] of one shape, got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        self.keys = keys
        self.values = values
        self.lengths: list[int] = [0] * keys.shape[1]

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        rows: int,
        kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> RowKVCache:
        """An empty cache of `rows` rows of `max_length` slots (zero-filled: finite everywhere)."""
        if min(num_layers, rows, kv_heads, head_dim, max_length) < 1:
            raise ValueError(
                f"every size must be >= 1: layers={num_layers} rows={rows} "
                f"kv_heads={kv_heads} head_dim={head_dim} max_length={max_length}"
            )
        keys = torch.zeros(
            (num_layers, rows, kv_heads, max_length, head_dim), dtype=dtype, device=device
        )
        return cls(keys, torch.zeros_like(keys))

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_rows(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one token's keys and values take in one row."""
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def token_bytes(self) -> int:
        _, _, g, _, d = self.keys.shape
        return self.bytes_per_token(self.num_layers, g, d, self.keys.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (keys and values)."""
        return 2 * self.keys.numel() * self.keys.element_size()

    @property
    def bytes_in_use(self) -> int:
        """Bytes holding valid keys/values (the rows' lengths)."""
        return sum(self.lengths) * self.token_bytes

    # ---- one forward -----------------------------------------------------------------------

    def begin(self, rows: range, t: int) -> RowWrite:
        """Append T slots to each of `rows` (a contiguous range) and say where they are."""
        if rows.step != 1 or not 0 <= rows.start < rows.stop <= self.num_rows:
            raise ValueError(f"rows must be a non-empty range within {self.num_rows}, got {rows}")
        starts = self.lengths[rows.start : rows.stop]
        if max(starts) + t > self.max_length:
            raise CacheOverflowError(
                f"row cache overflow: {max(starts)} cached + {t} new tokens > "
                f"{self.max_length} slots per row"
            )
        device = self.keys.device
        start_B1 = torch.tensor(starts, dtype=torch.int64, device=device)[:, None]
        slots_BT = start_B1 + torch.arange(t, device=device)
        rows_BT = torch.arange(rows.start, rows.stop, device=device)[:, None].expand_as(slots_BT)
        for r in rows:
            self.lengths[r] += t
        return RowWrite(
            self,
            rows.start,
            rows.stop,
            rows_BT,
            slots_BT,
            (start_B1[:, 0] + t).to(torch.int32),
            max(starts) + t,
        )

    def compact(self, rows: range, starts: Sequence[int], nodes: Sequence[Sequence[int]]) -> None:
        """Row rows[b] keeps nodes[b] of the tree it appended at starts[b]: slots starts[b] +
        nodes[b] (ascending, nodes[b][j] >= j) move to starts[b] + j, one gather and one scatter
        for all rows (of the slots that move); its length becomes starts[b] + len(nodes[b])."""
        if not (len(starts) == len(nodes) == len(rows)):
            raise ValueError(f"{len(rows)} rows, {len(starts)} starts, {len(nodes)} node lists")
        for r, start, kept in zip(rows, starts, nodes, strict=True):
            if not kept or start + kept[-1] >= self.lengths[r]:
                raise ValueError(f"row {r}: nodes {list(kept)} are not within its appended slots")
        moves = [
            (r, start + i, start + j)
            for r, start, kept in zip(rows, starts, nodes, strict=True)
            for j, i in enumerate(kept)
            if i != j
        ]
        if moves:
            # Advanced indices on dims 1 and 3 (rows, slots) read [M, layers, G, D] at once;
            # the read copies first, so rows may move onto slots that others read.
            row_M, src_M, dst_M = torch.tensor(moves, device=self.keys.device).unbind(1)
            for buf in (self.keys, self.values):
                buf[:, row_M, :, dst_M] = buf[:, row_M, :, src_M]
        for r, start, kept in zip(rows, starts, nodes, strict=True):
            self.lengths[r] = start + len(kept)

    # ---- rows --------------------------------------------------------------------------------

    def set_length(self, row: int, length: int) -> None:
        """Keep the first `length` slots of `row` (a shorter length forgets a suffix)."""
        if not 0 <= length <= self.max_length:
            raise ValueError(f"length {length} is outside [0, {self.max_length}]")
        self.lengths[row] = length

    def free(self, row: int) -> None:
        """Empty `row` (its memory is reusable at once)."""
        self.lengths[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s valid slots into row `dst`, then empty `src`."""
        n = self.lengths[src]
        for buf in (self.keys, self.values):
            buf[:, dst, :, :n] = buf[:, src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def resize(self, rows: int, max_length: int) -> None:
        """Reallocate as `rows` rows of `max_length` slots, keeping every live row's slots (a
        smaller size must still hold them)."""
        live = [r for r, n in enumerate(self.lengths) if n > 0]
        if (live and max(live) >= rows) or max(self.lengths) > max_length:
            raise ValueError(f"{rows} rows x {max_length} slots cannot hold rows {self.lengths}")
        layers, _, g, _, d = self.keys.shape
        keys = self.keys.new_zeros((layers, rows, g, max_length, d))
        values = torch.zeros_like(keys)
        r, n = min(rows, self.num_rows), max(self.lengths)
        keys[:, :r, :, :n] = self.keys[:, :r, :, :n]
        values[:, :r, :, :n] = self.values[:, :r, :, :n]
        self.keys, self.values = keys, values
        self.lengths = (self.lengths + [0] * rows)[:rows]
