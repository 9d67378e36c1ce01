"""Per-step engine overhead and plain-decoding speed against HF `generate`, in one run.

For each prompt (MT-Bench first turns, chat template), interleaved after a warm-up:

* `hf`: `model.generate(do_sample=False)`, the baseline;
* `engine-plain`: the engine without heads (plain decoding through the same loop);
* `engine-medusa`: the engine with heads (`--heads`, default: untrained random heads of the model's
  shape, which accept little but cost what trained heads cost) on `--tree`.

The engine's step time is split into the model's forward (decoder + LM head) and everything else
(heads, candidates, acceptance, cache compaction, bookkeeping): the "overhead". Greedy outputs are
checked token for token against `hf`. Prints a table, then one JSON line.

    python -m eval.bench_overhead --model smollm2-135m-instruct --dtype bf16 --limit 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from eval.prompts import load_prompts
from eval.timing import CallTimer, environment, heads_label, load_average


@dataclass
class MethodStats:
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    decode_s: float = 0.0  # time after the prefill
    model_s: float = 0.0  # decoder + LM head, decode steps only
    mismatches: int = 0
    taus: list[float] = field(default_factory=list)

    def row(self) -> dict:
        tok_s = self.tokens / self.seconds if self.seconds else 0.0
        overhead = 1 - self.model_s / self.decode_s if self.decode_s and self.model_s else None
        return {
            "tokens_per_s": round(tok_s, 2),
            "ms_per_step": round(1000 * self.decode_s / self.steps, 2) if self.steps else None,
            "overhead_share": None if overhead is None else round(overhead, 4),
            "tau": round(sum(self.taus) / len(self.taus), 3) if self.taus else None,
            "greedy_mismatches": self.mismatches,
            "tokens": self.tokens,
        }


def main(argv: Sequence[str] | None = None) -> int:
    from medusa_engine.config import HeadsConfig
    from medusa_engine.engine import build_engine
    from medusa_engine.heads import MedusaHeads
    from medusa_engine.heads_io import load_heads
    from medusa_engine.hf_adapter import HFModel, encode_prompt, quiet_transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--heads", default=None, help="heads folder (default: random heads)")
    p.add_argument("--tree", default="cpu_16")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--attention", default="hf", help="engine attention: hf or a backend name")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    quiet_transformers()
    model = HFModel.load(args.model, dtype=args.dtype)
    # The HF baseline keeps the model's own attention; with ours the engines load their own copy.
    hf_model = model.model
    if args.attention != "hf":
        model = HFModel.load(args.model, dtype=args.dtype, attention=args.attention)
    if args.heads:
        heads = load_heads(args.heads)
    else:
        torch.manual_seed(0)
        heads = MedusaHeads(HeadsConfig(4, 1, model.hidden_size, model.vocab_size))
    forward_t, logits_t = CallTimer(), CallTimer()
    model.forward = forward_t.wrap(model.forward)  # type: ignore[method-assign]
    model.logits = logits_t.wrap(model.logits)  # type: ignore[method-assign]
    engines = {
        "engine-plain": build_engine(model, None, "plain"),
        "engine-medusa": build_engine(model, heads, args.tree),
    }
    prompts = [
        encode_prompt(model.tokenizer, p.text) for p in load_prompts("mt_bench")[: args.limit]
    ]
    stats = {name: MethodStats() for name in ["hf", *engines]}
    pad = model.tokenizer.pad_token_id or 0

    def run_hf(ids: list[int]) -> list[int]:
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return out[0, len(ids) :].tolist()

    load_start = load_average()
    run_hf(prompts[0][:16])  # warm-up
    engines["engine-medusa"].generate(prompts[0][:16], 8)
    for ids in prompts:
        start = time.perf_counter()
        ref = run_hf(ids)
        hf = stats["hf"]
        hf.seconds += time.perf_counter() - start
        hf.tokens += len(ref)
        for name, engine in engines.items():
            forward_t.seconds = logits_t.seconds = 0.0
            result = engine.generate(ids, args.max_new_tokens)
            s = stats[name]
            s.tokens += len(result.token_ids)
            s.seconds += result.total_s
            s.steps += result.steps
            s.taus.append(result.mean_accepted)
            s.mismatches += int(result.token_ids != ref)
            # The prefill is one forward + one logits call: split it off by the recorded time.
            s.decode_s += result.total_s - result.prefill_s
            s.model_s += forward_t.seconds + logits_t.seconds - result.prefill_s
        print(f"prompt of {len(ids)} tokens done", file=sys.stderr)

    summary = {
        "benchmark": "engine_overhead",
        "model": args.model,
        "dtype": args.dtype,
        "tree": args.tree,
        "attention": args.attention,
        "heads": heads_label(args.heads, args.model) if args.heads else "random(4x1)",
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        **environment(model.device, model.dtype, load_start),
        "methods": {name: s.row() for name, s in stats.items()},
    }
    hf_rate = summary["methods"]["hf"]["tokens_per_s"]
    print(
        f"{'method':<15}{'tok/s':>9}{'vs hf':>8}{'ms/step':>9}{'overhead':>10}{'tau':>7}{'mismatch':>10}"
    )
    for name, row in summary["methods"].items():
        ratio = row["tokens_per_s"] / hf_rate if hf_rate else 0
        over = "-" if row["overhead_share"] is None else f"{100 * row['overhead_share']:.1f}%"
        print(
            f"{name:<15}{row['tokens_per_s']:>9.1f}{ratio:>7.2f}x{row['ms_per_step'] or 0:>9.1f}"
            f"{over:>10}{row['tau'] or 1:>7.2f}{row['greedy_mismatches']:>10}"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
