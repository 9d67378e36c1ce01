"""Draft cost per step and per depth, and what capturing EAGLE-3's aux hidden states costs.

    python -m eval.bench_draft --model smollm2-135m-instruct --dtype bf16 --tree dynamic:64 \
        --heads medusa_engine/assets/heads/smollm2-135m-instruct-eagle3 \
        --heads medusa_engine/assets/heads/smollm2-135m-instruct --lookup 0 --limit 10

For each `--heads` folder (one greedy engine each on the same loaded model, interleaved on every
prompt, after a warm-up):

* ms per decode step and ms of it spent drafting (the drafter's `draft` / `draft_dynamic` call:
  the draft model's forwards, top-k and tree building);
* on dynamic trees, ms per depth: each `expand` call of `dynamic_tree.grow`, i.e. the draft
  model's forward over that depth's nodes and its LM head (the first also brings the draft
  layer's cache up to date for an EAGLE-3 drafter: the positions accepted last step);
* τ, and greedy mismatches against the first heads' output (none expected in fp32).

Then the base model's verification forward over `--capture-tokens` new tokens with and without
the three forward hooks of `hf_adapter/aux_hidden.py` (interleaved, `--capture-repeats` each):
the cost of taking the aux states from the verification forward. Prints a table, then one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from eval.prompts import load_prompts
from eval.timing import environment, load_average, repo_relative, sync


class DraftTimer:
    """Seconds of each draft call and of each `grow` depth, per engine."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.draft_s: list[float] = []
        self.depth_s: dict[int, list[float]] = defaultdict(list)

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.draft_s.append(time.perf_counter() - start)
            return out

        return call

    def timed_expand(self, expand: Callable[..., Any]) -> Callable[..., Any]:
        depth = iter(range(1, 1000))

        def call(rows_B: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
            d = next(depth)
            sync(self.device)
            start = time.perf_counter()
            out = expand(rows_B, tokens_B)
            sync(self.device)
            self.depth_s[d].append(time.perf_counter() - start)
            return out

        return call


def _ms(values: list[float]) -> float | None:
    return round(1000 * sum(values) / len(values), 3) if values else None


def capture_cost(model: Any, layers: tuple[int, ...], tokens: int, repeats: int) -> dict:
    """ms of one forward over `tokens` new tokens (after as many cached ones) without and with
    the aux-capture hooks, interleaved."""
    from medusa_engine.hf_adapter.aux_hidden import AuxCapture

    ids = torch.randint(0, model.vocab_size, (2 * tokens,), device=model.device)
    pos = torch.arange(2 * tokens, device=model.device)
    times: dict[str, list[float]] = {"without": [], "with": []}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for mode in ("without", "with"):
                capture = AuxCapture(model, layers) if mode == "with" else None
                session = model.new_session()
                model.forward(ids[:tokens], pos[:tokens], session)
                sync(model.device)
                start = time.perf_counter()
                model.forward(ids[tokens:], pos[tokens:], session)
                sync(model.device)
                if i:  # the first round warms up
                    times[mode].append(time.perf_counter() - start)
                if capture is not None:
                    capture.close()
    without, with_ = _ms(times["without"]), _ms(times["with"])
    return {
        "tokens": tokens,
        "repeats": repeats,
        "ms_without_hooks": without,
        "ms_with_hooks": with_,
        "extra_share": round(with_ / without - 1, 4) if without and with_ else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from medusa_engine import drafters as drafters_module
    from medusa_engine import eagle3 as eagle3_module
    from medusa_engine.eagle3 import Eagle3Drafter, default_aux_layers
    from medusa_engine.engine import build_engine
    from medusa_engine.heads_io import load_heads
    from medusa_engine.hf_adapter import HFModel, encode_prompt, quiet_transformers
    from medusa_engine.hf_adapter.aux_hidden import AuxCapture, decoder_layers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--heads", action="append", required=True, help="heads folder (repeatable)")
    p.add_argument("--tree", default="dynamic:64")
    p.add_argument("--lookup", type=int, default=0)
    p.add_argument("--prompts", default="mt_bench")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--capture-tokens", type=int, default=64)
    p.add_argument("--capture-repeats", type=int, default=30)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    quiet_transformers()
    model = HFModel.load(args.model, dtype=args.dtype)
    engines, timers = {}, {}
    for folder in args.heads:
        name = Path(folder).resolve().name
        engine = build_engine(model, load_heads(folder), args.tree, lookup=args.lookup)
        timer = DraftTimer(model.device)
        drafter = engine.drafter
        for method in ("draft", "draft_dynamic"):
            setattr(drafter, method, timer.timed(getattr(drafter, method)))
        engines[name], timers[name] = engine, timer

    active: list[DraftTimer] = []  # the engine now generating
    grow = eagle3_module.grow

    def timed_grow(spec: Any, root: Any, expand: Any, vocab: Any = None) -> Any:
        return grow(spec, root, active[0].timed_expand(expand), vocab)

    eagle3_module.grow = drafters_module.grow = timed_grow  # type: ignore[attr-defined,assignment]

    prompts = [
        encode_prompt(model.tokenizer, p.text) for p in load_prompts(args.prompts, args.limit)
    ]
    stats: dict[str, dict[str, Any]] = {
        name: {"steps": 0, "decode_s": 0.0, "tokens": 0, "taus": [], "mismatches": 0}
        for name in engines
    }
    load_start = load_average()
    for name, engine in engines.items():  # warm-up, not measured
        active[:] = [timers[name]]
        engine.generate(prompts[0][:16], 8)
        timers[name].draft_s.clear()
        timers[name].depth_s.clear()
    for ids in prompts:
        reference = None
        for name, engine in engines.items():
            active[:] = [timers[name]]
            result = engine.generate(ids, args.max_new_tokens)
            s = stats[name]
            s["steps"] += result.steps
            s["decode_s"] += result.total_s - result.prefill_s
            s["tokens"] += len(result.token_ids)
            s["taus"].append(result.mean_accepted)
            reference = reference or result.token_ids
            s["mismatches"] += int(result.token_ids != reference)
        print(f"prompt of {len(ids)} tokens done", file=sys.stderr)
    eagle3_module.grow = drafters_module.grow = grow  # type: ignore[attr-defined]

    rows = {}
    for name, s in stats.items():
        t = timers[name]
        rows[name] = {
            "heads": repo_relative(str(Path(args.heads[list(stats).index(name)]).resolve())),
            "tree": args.tree,
            "tau": round(sum(s["taus"]) / len(s["taus"]), 3),
            "ms_per_step": round(1000 * s["decode_s"] / max(s["steps"], 1), 3),
            "draft_ms_per_step": _ms(t.draft_s),
            "draft_share": round(sum(t.draft_s) / s["decode_s"], 4) if s["decode_s"] else None,
            "draft_ms_per_depth": {d: _ms(v) for d, v in sorted(t.depth_s.items())},
            "greedy_mismatches_vs_first": s["mismatches"],
            "tokens": s["tokens"],
        }
    capture = None
    hooks = [
        e.drafter.capture
        for e in engines.values()
        if isinstance(e.drafter, Eagle3Drafter) and isinstance(e.drafter.capture, AuxCapture)
    ]
    layers = hooks[0].layer_ids if hooks else default_aux_layers(len(decoder_layers(model)))
    for h in hooks:  # measure the hooks alone: the drafters' own go first
        h.close()
    capture = capture_cost(model, tuple(layers), args.capture_tokens, args.capture_repeats)
    summary = {
        "benchmark": "draft_cost",
        "model": args.model,
        "dtype": args.dtype,
        "lookup": args.lookup,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        **environment(model.device, model.dtype, load_start),
        "engines": rows,
        "aux_capture": capture,
    }
    print(f"{'heads':<40}{'tau':>7}{'ms/step':>9}{'draft ms':>10}{'share':>8}  ms per depth")
    for name, r in rows.items():
        depths = " ".join(f"{v:.2f}" for v in r["draft_ms_per_depth"].values())
        print(
            f"{name:<40}{r['tau']:>7.2f}{r['ms_per_step']:>9.2f}{r['draft_ms_per_step'] or 0:>10.2f}"
            f"{100 * (r['draft_share'] or 0):>7.1f}%  {depths}"
        )
    print(
        f"verification forward of {capture['tokens']} tokens: {capture['ms_without_hooks']} ms "
        f"without the aux hooks, {capture['ms_with_hooks']} ms with"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
