"""Per-step latency of plain decoding vs tree verification, for HF and the engine, in one run.

Meant for a GPU session (a 7B Llama shape with random bf16 weights), smoke-tested on the CPU with
the `tiny` preset. For each way of running the base model it times one decode step over a cache
of `--prefix` tokens, with 1 new token (plain decoding) and with trees of 16/32/64 nodes:

* `hf-eager`: transformers' own attention over a `DynamicCache`, tree as a 4D mask (our adapter's
  `attention="hf"` path, i.e. what HF assisted generation does);
* `hf-static-compiled`: transformers' `StaticCache` with the forward under
  `torch.compile(mode="reduce-overhead")` (CUDA graphs) - failures are reported, not hidden;
* `engine-<backend>`: the engine's full verification step (`MedusaGenerator.step`: heads,
  candidates, forward, acceptance, compaction) on our attention backend over the static cache;
* `engine-graph-<backend>`: the same step as a `StaticStep` (static shapes, bookkeeping on the
  device) captured in one CUDA graph per tree size; timed per step with the state load, the
  replay and the host's read of the emitted tokens (what a streaming loop pays). Size 1 is plain
  decoding through the same graph. On CUDA the engine runs RMSNorms as one kernel each
  (`attention.rmsnorm`); `engine-graph-<backend>+eager-norms` keeps transformers' norms.

`--profile <backend>` prints instead where the GPU time of an eager engine step goes, per kernel.

Warm-up, device synchronisation, median of `--repeats`; prints a table, then one JSON line.

    python -m eval.bench_step --preset 7b --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from eval.timing import environment, load_average, median_ms, sync

PRESETS: dict[str, dict[str, Any]] = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "160m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _random_model(preset: str, dtype: torch.dtype, device: torch.device, context: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=max(4096, context))
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _engine_model(model_hf, attention: str):
    """The engine's view of the model; `<backend>+eager-norms` keeps transformers' own norms
    (to compare with the default one-kernel norms on CUDA in the same run)."""
    from medusa_engine.hf_adapter import HFModel

    backend, _, option = attention.partition("+")
    fused = False if option == "eager-norms" else None
    return HFModel(model_hf, name="random", attention=backend, fused_norms=fused)


def _prefilled_engine(model_hf, attention: str, sizes: Sequence[int], prefix: int):
    """(model, engine with 4 random Medusa heads, session, decode state) after a prefill of
    `prefix` random tokens into a cache sized for the largest tree."""
    from medusa_engine.config import HeadsConfig
    from medusa_engine.engine import build_engine
    from medusa_engine.heads import MedusaHeads
    from medusa_engine.model import DecodeState

    model = _engine_model(model_hf, attention)
    heads = MedusaHeads(HeadsConfig(4, 1, model.hidden_size, model.vocab_size))
    engine = build_engine(model, heads, "plain")
    ids = torch.randint(3, model.vocab_size, (prefix,), generator=torch.Generator().manual_seed(0))
    session = model.new_session(capacity=prefix + max(sizes) + 8)
    state = engine.prefill(ids.tolist(), session)
    return model, engine, session, DecodeState(state.hidden_E.clone(), state.root)


def _engine_steps(model_hf, attention: str, sizes: Sequence[int], prefix: int):
    """(size, step) for the engine's eager verification step (all of it) at each tree size."""
    from medusa_engine.tune import synthetic_tree

    model, engine, session, state = _prefilled_engine(model_hf, attention, sizes, prefix)
    for size in sizes:
        engine.set_tree(synthetic_tree(size, 4))

        def step() -> None:
            engine.step(state, session)
            session.truncate(prefix)

        yield size, step
    model.restore()  # give the model back as it came


def bench_engine(
    model_hf, attention: str, sizes: Sequence[int], prefix: int, repeats: int, out: dict
) -> None:
    """Time the engine's verification step (all of it) for each tree size."""
    for size, step in _engine_steps(model_hf, attention, sizes, prefix):
        out[size] = median_ms(step, model_hf.device, iters=repeats, warmup=2)


ATTENTION_KERNELS = ("_split_kv_kernel", "_combine_kernel")  # the triton backend's two kernels


def kv_read_bytes(config, kv_len: int, dtype: torch.dtype) -> int:
    """Bytes of K and V that one step's attention reads: every layer, every kv head, kv_len keys."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_key = 2 * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    return config.num_hidden_layers * kv_len * per_key


def profile_engine(model_hf, attention: str, sizes: Sequence[int], prefix: int) -> None:
    """Print where the GPU time of one eager engine step goes, per kernel, for each tree size
    (the kernels are those the captured graph replays; eager launch gaps are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    for size, step in _engine_steps(model_hf, attention, sizes, prefix):
        step(), step()
        sync(model_hf.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync(model_hf.device)
        kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in kernels) / 3
        print(f"--- engine-{attention}, {size} nodes: {total / 1000:.2f} ms of kernels per step")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:14]:
            print(f"{e.self_device_time_total / 3000:8.3f} ms {e.count // 3:5d}x  {e.key[:100]}")
        attention_us = (
            sum(e.self_device_time_total for e in kernels if e.key in ATTENTION_KERNELS) / 3
        )
        if attention_us:
            kv_bytes = kv_read_bytes(model_hf.config, prefix + size, model_hf.dtype)
            print(
                f"attention kernels ({' + '.join(ATTENTION_KERNELS)}): {attention_us:.1f} us per "
                f"step = {kv_bytes / attention_us / 1e6:.3f} TB/s of K/V read "
                f"({kv_bytes / 1e6:.1f} MB over {prefix + size} keys, all layers)"
            )


def bench_engine_graph(
    model_hf, attention: str, sizes: Sequence[int], prefix: int, repeats: int, out: dict
) -> None:
    """Time a CUDA-graph-captured `StaticStep` (drafting to compaction) for each tree size."""
    from medusa_engine.static_step import StaticStep
    from medusa_engine.tune import synthetic_tree

    model, engine, session, state = _prefilled_engine(model_hf, attention, sizes, prefix)
    for size in sizes:
        tree = synthetic_tree(size, 4)
        step = StaticStep(model, engine.drafter if size > 1 else None, tree, session)

        def run(step: StaticStep = step) -> None:
            step.run(state)
            session.truncate(prefix)

        out[size] = median_ms(run, model.device, iters=repeats, warmup=2)
    model.restore()  # give the model back as it came


def bench_hf_static(model_hf, sizes: Sequence[int], prefix: int, repeats: int, out: dict) -> None:
    """transformers' StaticCache + compiled forward (CUDA graphs); each size is its own graph.

    Each size gets a fresh compilation with static shapes. transformers 5's static cache writes
    at its own running length (`cumulative_length`), not at `cache_position`, so every call would
    append; the length is set back to the prefix before each timed call (untimed), so that every
    call runs over the same `prefix` cached tokens, as the engine's steps do. Without that the
    cache overflowed after a few calls: an index-out-of-bounds assert inside the compiled graph.
    """
    from transformers import StaticCache

    from medusa_engine.hf_adapter import cache_keyword

    device, cache_kw = model_hf.device, cache_keyword(model_hf)
    cache = StaticCache(config=model_hf.config, max_cache_len=prefix + max(sizes) + 8)
    ids = torch.randint(3, model_hf.config.vocab_size, (1, prefix), device=device)
    with torch.inference_mode():
        model_hf(input_ids=ids, use_cache=True, **{cache_kw: cache})
    lengths = [
        t for layer in cache.layers if (t := getattr(layer, "cumulative_length", None)) is not None
    ]

    def rewind() -> None:  # in place: the compiled graph holds these tensors' addresses
        for length in lengths:
            length.fill_(prefix)

    for size in sizes:
        torch._dynamo.reset()
        compiled = torch.compile(model_hf.forward, mode="reduce-overhead", dynamic=False)
        tokens = torch.randint(3, model_hf.config.vocab_size, (1, size), device=device)
        positions = torch.arange(prefix, prefix + size, device=device)[None]

        def call(
            t: torch.Tensor = tokens, p: torch.Tensor = positions, n: int = size, fn: Any = compiled
        ) -> object:
            return fn(
                input_ids=t,
                position_ids=p,
                cache_position=p[0],
                use_cache=True,
                logits_to_keep=n,
                **{cache_kw: cache},
            )

        try:
            with torch.inference_mode():
                out[size] = median_ms(call, device, iters=repeats, warmup=2, before=rewind)
        except Exception as err:  # noqa: BLE001 - report the failure in the table, keep going
            out[size] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="7b", choices=list(PRESETS))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefix", type=int, default=512, help="tokens already in the cache")
    p.add_argument("--sizes", default="1,16,32,64", help="tree sizes (1 = plain decoding)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--methods",
        default="hf-eager,engine-triton,engine-graph-triton,engine-graph-sdpa,hf-static-compiled",
        help="hf-static-compiled last: a failure inside a CUDA graph can poison the context",
    )
    p.add_argument(
        "--profile",
        metavar="BACKEND",
        help="instead: per-kernel GPU time of the eager engine step on BACKEND",
    )
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    load_start = load_average()
    sizes = [int(s) for s in args.sizes.split(",")]
    model_hf = _random_model(args.preset, DTYPES[args.dtype], device, args.prefix + max(sizes) + 8)
    if args.profile:
        profile_engine(model_hf, args.profile, sizes, args.prefix)
        return 0
    results: dict[str, dict[Any, Any]] = {}
    for method in args.methods.split(","):
        row: dict[Any, Any] = {}
        results[method] = row
        try:
            if method == "hf-eager":
                bench_engine_forward_only(model_hf, sizes, args.prefix, args.repeats, row)
            elif method == "hf-static-compiled":
                bench_hf_static(model_hf, sizes, args.prefix, args.repeats, row)
            elif method.startswith("engine-graph-"):
                bench_engine_graph(
                    model_hf,
                    method.removeprefix("engine-graph-"),
                    sizes,
                    args.prefix,
                    args.repeats,
                    row,
                )
            elif method.startswith("engine-"):
                bench_engine(
                    model_hf, method.removeprefix("engine-"), sizes, args.prefix, args.repeats, row
                )
            else:
                raise ValueError(f"unknown method {method!r}")
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        print(f"{method} done: {row}", file=sys.stderr, flush=True)  # kept if a later one hangs

    last = sizes[-1]
    print(
        f"{'method':<32}"
        + "".join(f"{f'{s} nodes':>12}" for s in sizes)
        + f"{f'{last}/1':>8}   (ms per step)"
    )
    for method, row in results.items():
        cells = [row.get(s) for s in sizes]
        text = [f"{c:>12.2f}" if isinstance(c, float) else f"{'-':>12}" for c in cells]
        big, one = row.get(last), row.get(1)
        ratio = big / one if isinstance(big, float) and isinstance(one, float) else None
        text.append(f"{ratio:>8.2f}" if ratio is not None else f"{'-':>8}")
        print(f"{method:<32}" + "".join(text) + (f"   {row['error']}" if "error" in row else ""))
    summary = {
        "benchmark": "step_latency",
        "preset": args.preset,
        "prefix": args.prefix,
        **environment(device, DTYPES[args.dtype], load_start),
        "ms_per_step": {m: {str(k): v for k, v in r.items()} for m, r in results.items()},
    }
    print(json.dumps(summary))
    return 0


def bench_engine_forward_only(
    model_hf, sizes: Sequence[int], prefix: int, repeats: int, out: dict
) -> None:
    """HF's own attention over a DynamicCache: one forward + logits of a tree of each size."""
    from medusa_engine.hf_adapter import HFModel
    from medusa_engine.tune import synthetic_tree

    model = HFModel(model_hf, name="random", attention="hf")
    ids = torch.randint(3, model.vocab_size, (prefix,), device=model.device)
    session = model.new_session()
    model.forward(ids, torch.arange(prefix, device=model.device), session)
    session.commit(0, ids.tolist())
    for size in sizes:
        tree = synthetic_tree(size, 4).to(model.device)
        tokens = torch.randint(3, model.vocab_size, (size,), device=model.device)

        def step(t=tree, x=tokens) -> None:
            hidden = model.forward(
                x, t.depth_N + prefix, session, t.mask_NN if t.num_nodes > 1 else None
            )
            model.logits(hidden)
            session.truncate(prefix)

        out[size] = median_ms(step, model.device, iters=repeats, warmup=2)


if __name__ == "__main__":
    sys.exit(main())
