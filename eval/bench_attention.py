"""Benchmark of the attention backends on a GPU: tree verification and causal prefill.

Shape legend: B batch (1), H query heads, G kv heads, Q queries, K keys, D head dim.

Tree verification: Q tree queries (64) over a cache of K keys (4k, 16k), the last Q of which are
the tree, with a random tree mask. Reported as the effective K/V read bandwidth,
bytes(K) + bytes(V) / time, the figure that bounds decoding: every backend must read the cache
once, and nothing else is large. Baseline: SDPA with a boolean mask on its memory-efficient
backend (the flash backend takes no mask), as in ANCHORS.md (0.27 / 0.30 TB/s at 4k / 16k).

Causal prefill: Q = K (8k) with SDPA's flash backend as the baseline, in TFLOP/s
(4 B H Q K D / 2 for a causal mask).

The tree is static, so its mask is prepared once outside the timed region for every backend (a
bool [Q, K] mask for SDPA, a block mask for flex, bits for Triton), as an engine would. Timing:
warm-up, then CUDA events around each call, the L2 cache flushed before each (so the cache is
read from HBM), median reported. Two flushes, each timed (`--flush`): `write` zeroes a 256 MiB
buffer (triton's `do_bench` way), which leaves the L2 full of dirty lines that the timed call must
write back to HBM as it evicts them (~50 MB on an H100, a fixed cost of its own); `read` sums that
buffer, which leaves clean lines, as a decode step does (its GEMMs read weights just before the
attention). `python -m eval.bench_step --profile triton --prefix 4096` measures the kernels inside
the 7B step itself, with no flush at all. Each call is timed twice: launched from Python (`us`), and
replayed from a CUDA graph captured around it (`graph us`, the figure the bandwidth columns use),
which is how the engine's static step runs it: at 4k keys a call is short enough (tens of
microseconds) that Python's launch overhead, not the GPU, sets the eager time. Each backend's
output is checked against SDPA (max abs diff).

    python -m eval.bench_attention            # prints a table, then one JSON line
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attention.masks import full_mask_QK, tree_bitmask_QW
from eval.timing import FLUSHES, environment, graph_of, l2_flush, load_average, median_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def random_tree(n: int, seed: int) -> torch.Tensor:
    from attention.masks import ancestor_mask

    gen = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, n)]
    return ancestor_mask(torch.tensor(parents))


def backends_for(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_QQ: torch.Tensor | None, causal: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument callable computing out_BHQD, with all mask preparation done."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention.flex import attention_flex, flex_block_mask
    from attention.sdpa import attention_sdpa
    from attention.triton_kernel import attention_triton

    q_len, kv_len, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1 / math.sqrt(d)
    kv_len_B = torch.full((q.shape[0],), kv_len, dtype=torch.int32, device=q.device)
    block_mask = flex_block_mask(q_len, kv_len, kv_len_B, causal=causal, block_QQ=tree_QQ)
    bits_QW = None if tree_QQ is None else tree_bitmask_QW(tree_QQ)
    gqa = q.shape[1] != k.shape[1]

    def flex() -> torch.Tensor:
        return attention_flex(
            q, k, v, scale=scale, kv_len_B=kv_len_B, block_mask=block_mask, return_lse=False
        )[0]

    def triton() -> torch.Tensor:
        return attention_triton(
            q, k, v, scale=scale, kv_len_B=kv_len_B, causal=causal, tree_bits_QW=bits_QW
        )[0]

    if causal:

        def sdpa() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
                )

        return {"sdpa-flash": sdpa, "flex": flex, "triton": triton}
    mask_QK = full_mask_QK(q_len, kv_len, block_QQ=tree_QQ, device=q.device)

    def sdpa_efficient() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return attention_sdpa(q, k, v, mask_QK, scale)

    return {"sdpa-efficient": sdpa_efficient, "flex": flex, "triton": triton}


# name -> Tiles fields, each timed beside the default `triton` (`--sweep`)
SWEEP: dict[str, dict[str, Any]] = {
    "n32": {"block_n": 32},
    "n32-s4": {"block_n": 32, "num_stages": 4},
    "s4": {"num_stages": 4},
    "w8": {"num_warps": 8},
    "2wave": {"splits_x": 2},
}


def triton_variants(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_QQ: torch.Tensor | None, causal: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    """The Triton kernel with other launch parameters than its defaults (`--sweep`, `SWEEP`)."""
    from attention.triton_kernel import Tiles, attention_triton, default_num_splits

    kv_len_B = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    bits_QW = None if tree_QQ is None else tree_bitmask_QW(tree_QQ)
    n_m = max(1, math.ceil(q.shape[1] // k.shape[1] * q.shape[2] / 64))
    variants: dict[str, Callable[[], torch.Tensor]] = {}
    for name, fields in SWEEP.items():
        fields = dict(fields)
        if "splits_x" in fields:
            n_blocks = math.ceil(k.shape[2] / fields.get("block_n", 64))
            one_wave = default_num_splits(n_m * k.shape[1], n_blocks, q.device)
            fields["num_splits"] = one_wave * fields.pop("splits_x")
        tiles = Tiles(**fields)

        def fn(tiles: Tiles = tiles) -> torch.Tensor:
            return attention_triton(
                q, k, v, scale=q.shape[-1] ** -0.5, kv_len_B=kv_len_B, causal=causal,
                tree_bits_QW=bits_QW, tiles=tiles,
            )[0]  # fmt: skip

        variants[f"triton-{name}"] = fn
    return variants


def run_case(
    case: str, q_len: int, kv_len: int, args: argparse.Namespace, dtype: torch.dtype
) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(kv_len)

    def make(heads: int, n: int) -> torch.Tensor:
        return torch.randn(1, heads, n, args.head_dim, generator=gen, device="cuda").to(dtype)

    q, k, v = make(args.heads, q_len), make(args.kv_heads, kv_len), make(args.kv_heads, kv_len)
    causal = case == "prefill"
    tree_QQ = None if causal else random_tree(q_len, seed=kv_len).cuda()
    fns = backends_for(q, k, v, tree_QQ, causal)
    if args.sweep and not causal:
        fns |= triton_variants(q, k, v, tree_QQ, causal)
    baseline_out = next(iter(fns.values()))()
    kv_bytes = 2 * k.numel() * k.element_size()
    flops = 4 * args.heads * q_len * kv_len * args.head_dim / (2 if causal else 1)
    rows = []
    first, *others = args.flush

    def seconds_of(fn: Callable[[], object], flush: str) -> float:
        """Median seconds of fn by CUDA events, `l2_flush(flush)` before each call."""
        before = l2_flush(flush)
        return 1e-3 * median_ms(
            fn, "cuda", iters=args.iters, warmup=args.warmup, before=before, clock="events"
        )

    for name, fn in fns.items():
        row: dict = {"case": case, "backend": name, "q": q_len, "k": kv_len, "flush": first}
        try:
            eager_s = seconds_of(fn, first)
            out = fn()
            try:
                replay = graph_of(fn)
                seconds = seconds_of(replay, first)
                row["graph_us"] = seconds * 1e6
                for flush in others:  # the same graph, another L2 state before each replay
                    other_s = seconds_of(replay, flush)
                    row[f"graph_us_{flush}_flush"] = other_s * 1e6
                    row[f"kv_tb_s_{flush}_flush"] = kv_bytes / other_s / 1e12
            except Exception as exc:  # noqa: BLE001 - a backend that cannot be captured
                row["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                seconds = eager_s
            row.update(
                us=eager_s * 1e6,
                kv_tb_s=kv_bytes / seconds / 1e12,
                tflop_s=flops / seconds / 1e12,
                max_diff_vs_baseline=(out.float() - baseline_out.float()).abs().max().item(),
            )
        except Exception as exc:  # one failing backend must not hide the others' numbers
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def format_table(rows: list[dict], flushes: Sequence[str]) -> str:
    """One line per (case, backend); `us` / `graph us` / `KV TB/s` under the first flush, then
    the graph's KV TB/s under each other flush."""
    first, *others = flushes
    head = (
        f"{'case':<8} {'backend':<18} {'Q':>5} {'K':>6} {'us':>9} {'graph us':>9} "
        f"{'KV TB/s':>8} {'TFLOP/s':>8} {'diff':>8}"
        + "".join(f" {f'TB/s {f}':>10}" for f in others)
        + f"   (flush before each call: {first})"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<8} {r['backend']:<18} {r['q']:>5} {r['k']:>6}  {r['error']}")
            continue
        lines.append(
            f"{r['case']:<8} {r['backend']:<18} {r['q']:>5} {r['k']:>6} {r['us']:>9.1f} "
            f"{r.get('graph_us', float('nan')):>9.1f} "
            f"{r['kv_tb_s']:>8.3f} {r['tflop_s']:>8.1f} {r['max_diff_vs_baseline']:>8.1e}"
            + "".join(f" {r.get(f'kv_tb_s_{f}_flush', float('nan')):>10.3f}" for f in others)
        )
    return "\n".join(lines)


def flushes(text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    for mode in modes:
        if mode not in FLUSHES:
            raise argparse.ArgumentTypeError(f"unknown flush {mode!r}; expected {FLUSHES}")
    if not modes:
        raise argparse.ArgumentTypeError("give at least one flush")
    return modes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.bench_attention", description=__doc__.split("\n")[0]
    )
    p.add_argument("--tree-queries", type=int, default=64)
    p.add_argument(
        "--cache-lens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384]
    )
    p.add_argument("--prefill-len", type=int, default=8192, help="0 skips the prefill case")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument(
        "--flush",
        type=flushes,
        default=["write", "read"],
        help="comma list of L2 flushes before each timed call (write, read, none); the first "
        "sets the main columns, each other adds a bandwidth column (graph replays)",
    )
    p.add_argument("--sweep", action="store_true", help="also time Triton tile/split variants")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    load_start = load_average()
    rows = []
    for kv_len in args.cache_lens:
        rows += run_case("tree", args.tree_queries, kv_len, args, dtype)
    if args.prefill_len:
        rows += run_case("prefill", args.prefill_len, args.prefill_len, args, dtype)
    props = torch.cuda.get_device_properties(0)
    env = {**environment("cuda", dtype, load_start), "sm_count": props.multi_processor_count}
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(format_table(rows, args.flush))
    print(json.dumps({"bench": "attention", **env, "args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
