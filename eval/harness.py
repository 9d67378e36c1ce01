"""`medusa-engine bench`: speed and acceptance of Medusa against HF baselines on prompt sets.

    python -m eval.harness --model stories260k --heads H --prompts mt_bench --limit 3 --out DIR

Methods (`--methods`, any subset, in this order per prompt):

* `hf`: `model.generate(do_sample=False)`, the baseline every speedup is relative to;
* `hf-pld`: HF prompt-lookup decoding (`prompt_lookup_num_tokens=10`), greedy;
* `medusa`: the engine, greedy, with `--heads` on `--tree` (plus the `--lookup` branch);
* `hf-sample`: `model.generate(do_sample=True)` at `--temperature` (default 0.7), `--top-k`,
  `--top-p`: the like-for-like baseline of the sampling methods;
* `medusa-typical`: the engine at those settings with typical acceptance;
* `medusa-lossless`: the same with lossless acceptance (the output is distributed as
  `hf-sample`'s). Sampling methods reseed their sampler per prompt (`--seed` + prompt index), so
  each answer is reproducible.

All methods share one loaded model and run in one process, interleaved (for each prompt, every
method), after one warm-up call each; device work is synchronised before each clock read. Greedy
methods are compared token for token with `hf`; a difference is reported per prompt with its first
differing position. `--tree-sweep cpu_8,cpu_16,...` adds the greedy engine on each of those trees
(label `medusa@NAME`, with the same `--lookup` branch as `medusa`, so trees compare like for like;
the `--tree` one reuses `medusa`) on the same prompts. `--compare-heads DIR` (repeatable) adds
the greedy engine with other heads on the same model, tree setting and lookup branch (label
`medusa+NAME`, NAME the folder's name; with `--tree-sweep`, `medusa+NAME@TREE` too): two drafters
compared in one run. Metric definitions:
`eval/metrics.py`; outputs: `eval/report.py`. Progress goes to stderr; stdout is a table, then one
JSON line.

τ by method: the engine's per-step accept lengths (its prefill token is not a step); `hf`/`hf-pld`:
tokens per base-model forward as streamed by `generate` (one put per forward), so `hf` is 1.0 by
construction and `hf-pld`'s first step is its prefill, which also verifies a draft.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from eval import metrics, report
from eval.prompts import Prompt, load_prompts
from eval.timing import (
    MEMORY_SOURCES,
    HFStepClock,
    PeakMemory,
    environment,
    first_item_time,
    heads_label,
    repo_relative,
    sync,
)
from medusa_engine.cli import CLIError, add_model_args, engine_config, progress
from medusa_engine.config import SamplingConfig
from medusa_engine.engine import heads_folder, load_engine, tree_value
from medusa_engine.generate import GenerationResult, MedusaGenerator
from medusa_engine.hf_adapter import encode_prompt
from medusa_engine.models import resolve_model
from medusa_engine.tree import InvalidTreeError
from medusa_engine.tree_spec import parse_tree

METHODS = ("hf", "hf-pld", "medusa", "hf-sample", "medusa-typical", "medusa-lossless")
SAMPLED = {"hf-sample": None, "medusa-typical": "typical", "medusa-lossless": "lossless"}
GREEDY = ("hf", "hf-pld", "medusa")
BASELINE = "hf"
PLD_TOKENS = 10


@dataclass
class Method:
    """A labelled way to answer one prompt: `call(ids, max_new_tokens) -> (tokens, ttft, steps)`."""

    label: str
    call: Callable[[list[int], int], tuple[list[int], float | None, list[int]]]
    engine: Any = None  # MedusaGenerator for engine methods
    seed: int | None = None  # reseed the engine's sampler per prompt (sampling methods)
    tree: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench` flags (including the shared model flags)."""
    add_model_args(parser)
    parser.set_defaults(temperature=0.7)  # only the SAMPLED methods sample
    parser.add_argument("--prompts", required=True, help="mt_bench, spec_bench or a .jsonl file")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument(
        "--limit", type=int, default=None, help="N prompts, round-robin by category"
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument(
        "--tree-sweep",
        default=None,
        help="trees for `medusa`: presets or dynamic:N, e.g. cpu_8,dynamic:16",
    )
    parser.add_argument(
        "--compare-heads",
        action="append",
        default=[],
        metavar="DIR",
        help="also run the greedy engine with these heads (repeatable; label medusa+NAME), on "
        "the same --tree setting (their own tree.json for 'default', tuned for 'auto'), --lookup "
        "and --tree-sweep",
    )
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--concurrency",
        default=None,
        help="e.g. 1,2,4,8: continuous batching at each level against HF batched generate and "
        "the batch-1 engine (eval/bench_concurrency.py) instead of --methods",
    )
    parser.add_argument(
        "--arrival-rate", type=float, default=None, help="with --concurrency: Poisson req/s"
    )
    parser.add_argument(
        "--batch-plans",
        default=None,
        help="with --concurrency: tree + lookup per batch size (tune-tree --batch-sizes); "
        "default: the heads' batch_plans.json if they ship one",
    )


def register(subparsers: Any) -> None:
    """Add `bench` to the `medusa-engine` command (the `medusa_engine.commands` entry point)."""
    bench = subparsers.add_parser(
        "bench", help="throughput and acceptance benchmark against baselines"
    )
    add_arguments(bench)
    bench.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medusa-engine bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (CLIError, ValueError, OSError) as err:  # PromptsError, HeadsError, ...: ValueErrors
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"medusa-engine: error: {message}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    methods = _split(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CLIError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    _check_out_folder(Path(args.out))
    sweep = list(dict.fromkeys(_split(args.tree_sweep or "")))
    prompts = load_prompts(args.prompts, args.limit)
    if not prompts:
        raise CLIError("no prompts to run (--limit 0?)")
    if args.concurrency:
        from eval import bench_concurrency

        summary = bench_concurrency.run(args, prompts, progress)
        bench_concurrency.write(summary, Path(args.out))
        return 0
    config = engine_config(args)
    greedy_engine = load_engine(replace(config, sampling=SamplingConfig()), progress)
    try:
        sweep_trees = {name: parse_tree(name, greedy_engine.drafter) for name in sweep}
    except InvalidTreeError as err:
        raise CLIError(f"--tree-sweep: {err}") from None
    tree = tree_value(config.tree, heads_folder(config.heads, resolve_model(config.model)))
    model = greedy_engine.model
    runners = _methods(args, methods, tree, sweep_trees, greedy_engine)
    runners += _compared(args, methods, sweep, greedy_engine)
    encoded = [encode_prompt(model.tokenizer, p.text, args.raw) for p in prompts]
    load_start = os.getloadavg()
    for m in runners:  # warm-up: one short call each, not measured
        m.call(encoded[0][:16], 8)
    runs: dict[str, list[metrics.PromptRun]] = {m.label: [] for m in runners}
    texts: dict[str, list[str]] = {m.label: [] for m in runners}
    bar = tqdm(total=len(prompts) * len(runners), desc="bench", unit="run", file=sys.stderr)
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        for m in runners:
            bar.set_postfix_str(m.label)
            run_ = _measure(m, i, prompt, ids, args.max_new_tokens, model.device)
            runs[m.label].append(run_)
            texts[m.label].append(model.tokenizer.decode(run_.token_ids, skip_special_tokens=True))
            bar.update()
    bar.close()
    summary = _summary(args, prompts, runners, runs, model, load_start, sweep)
    report.write_all(Path(args.out), summary, runs, texts)
    print(report.table(summary))
    print(json.dumps(report.stdout_record(summary)))
    return 0


def _check_out_folder(out: Path) -> None:
    """Refuse an output folder that cannot take the results before any prompt runs."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"--out {out} is not writable")


def _methods(
    args: argparse.Namespace, methods: list[str], tree: str, sweep: dict[str, Any], greedy
) -> list[Method]:
    model = greedy.model
    out: list[Method] = []
    if "hf" in methods:
        out.append(Method("hf", _hf_call(model, None)))
    if "hf-pld" in methods:
        out.append(Method("hf-pld", _hf_call(model, PLD_TOKENS)))
    if "medusa" in methods:
        out.append(Method("medusa", _engine_call(greedy), greedy, tree=tree))
    for label, rule in SAMPLED.items():  # rule: the engine's acceptance; None = HF's sampling
        if label not in methods:
            continue
        if args.temperature <= 0:
            raise CLIError(f"{label} needs --temperature > 0")
        seed = 0 if args.seed is None else args.seed
        sampling = replace(engine_config(args).sampling, seed=seed)
        if rule is None:
            out.append(Method(label, _hf_call(model, None, sampling), seed=seed))
            continue
        engine = MedusaGenerator(
            model,
            greedy.drafter,
            greedy.tree,
            replace(sampling, acceptance=rule),
            lookup=greedy.lookup,
        )
        out.append(Method(label, _engine_call(engine), engine, seed, tree))
    for name, resolved in sweep.items():
        if name == tree and "medusa" in methods:
            continue  # the `medusa` runs are this tree's
        engine = MedusaGenerator(
            model, greedy.drafter, resolved, SamplingConfig(), lookup=greedy.lookup
        )
        out.append(Method(f"medusa@{name}", _engine_call(engine), engine, tree=name))
    return out


def _compared(
    args: argparse.Namespace, methods: list[str], sweep: list[str], greedy
) -> list[Method]:
    """The greedy engine with each `--compare-heads` folder, on the same model and settings."""
    from medusa_engine.config import HeadsError
    from medusa_engine.engine import build_engine
    from medusa_engine.heads_io import load_heads

    out: list[Method] = []
    for folder in args.compare_heads:
        path = Path(folder)
        tree = tree_value(args.tree, path)
        try:
            heads = load_heads(path)
            engine = build_engine(
                greedy.model, heads, "plain" if tree == "auto" else tree, lookup=greedy.lookup
            )
        except (HeadsError, OSError) as err:
            raise CLIError(f"--compare-heads {folder}: {err}") from None
        if tree == "auto":
            from medusa_engine.tune import auto_tree

            engine.set_tree(parse_tree(auto_tree(engine, path, progress).spec(), engine.drafter))
        label = f"medusa+{path.resolve().name}"
        if "medusa" in methods:
            out.append(Method(label, _engine_call(engine), engine, tree=tree))
        for name in sweep:
            if name == tree and "medusa" in methods:
                continue
            resolved = parse_tree(name, engine.drafter)
            other = MedusaGenerator(
                greedy.model, engine.drafter, resolved, SamplingConfig(), lookup=greedy.lookup
            )
            out.append(Method(f"{label}@{name}", _engine_call(other), other, tree=name))
    return out


def _hf_call(model, pld_tokens: int | None, sampling: SamplingConfig | None = None):
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    extra: dict[str, Any] = {"prompt_lookup_num_tokens": pld_tokens} if pld_tokens else {}
    extra["do_sample"] = sampling is not None
    if sampling is not None:  # every setting explicit: the model's generation_config has its own
        extra |= dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)

    @torch.inference_mode()
    def call(ids: list[int], max_new_tokens: int) -> tuple[list[int], float | None, list[int]]:
        input_ids = torch.tensor([ids], device=model.device)
        clock = HFStepClock(time.perf_counter())
        out = model.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            pad_token_id=pad, streamer=clock, **extra,
        )  # fmt: skip
        return out[0, len(ids) :].tolist(), clock.ttft_s, clock.step_tokens

    return call


def _engine_call(engine):
    def call(ids: list[int], max_new_tokens: int) -> tuple[list[int], float | None, list[int]]:
        result = GenerationResult()
        ttft = first_item_time(
            engine.stream(ids, max_new_tokens, result=result), time.perf_counter()
        )
        return result.token_ids, ttft, result.accepted_lengths

    return call


def _measure(
    m: Method, index: int, prompt: Prompt, ids: list[int], max_new_tokens: int, device
) -> metrics.PromptRun:
    if m.seed is not None:  # the engine's own sampler, or the global one HF `generate` uses
        (m.engine.generator if m.engine is not None else torch).manual_seed(m.seed + index)
    with PeakMemory(device) as mem:
        sync(device)
        start = time.perf_counter()
        tokens, ttft, steps = m.call(ids, max_new_tokens)
        sync(device)
        wall = time.perf_counter() - start
    return metrics.PromptRun(
        method=m.label, index=index, question_id=prompt.question_id, category=prompt.category,
        token_ids=tuple(tokens), wall_s=wall, ttft_s=wall if ttft is None else ttft,
        accept_lengths=tuple(steps), peak_mem_bytes=mem.peak_bytes,
    )  # fmt: skip


def _summary(args, prompts, runners, runs, model, load_start, sweep_trees) -> dict:
    trees = {m.label: m.engine.tree for m in runners if m.engine is not None}
    greedy = [
        m.label for m in runners if m.label in GREEDY or m.label.startswith(("medusa@", "medusa+"))
    ]
    results = metrics.summarize(
        runs, BASELINE, greedy, depth={label: t.max_depth for label, t in trees.items()}
    )
    sweep = None
    if sweep_trees:
        sweep = []
        heads = {"medusa": heads_label(str(args.heads), args.model)}
        heads |= {f"medusa+{Path(f).resolve().name}": repo_relative(f) for f in args.compare_heads}
        for engine, heads_name in heads.items():
            labels = {
                m.tree: m.label
                for m in runners
                if m.label == engine or m.label.startswith(engine + "@")
            }
            sweep += [
                {"heads": heads_name, "tree": name, "method": labels[name],
                 "nodes": trees[labels[name]].num_nodes,
                 **{k: results[labels[name]]["all"][k] for k in ("tau", "tokens_per_s", "speedup")}}
                for name in sweep_trees if name in labels
            ]  # fmt: skip
    stamp = _stamp(args, model, runners, load_start)
    warnings = []
    if model.device.type == "cpu" and max(stamp["load_avg_1m"]) > (stamp["cpu_count"] or 1):
        warnings.append(
            f"1-min load average {stamp['load_avg_1m']} (start, end) exceeds the "
            f"{stamp['cpu_count']} CPUs: timings were taken under contention"
        )
    return {
        "benchmark": "medusa_bench",
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "categories": sorted({p.category for p in prompts}),
        "max_new_tokens": args.max_new_tokens,
        "methods": [m.label for m in runners],
        "baseline": BASELINE,
        "stamp": stamp,
        "warnings": warnings,
        "results": results,
        "greedy_mismatches_total": sum(
            (r["mismatches"] or {}).get("count", 0) for r in results.values()
        ),
        "agreeing": metrics.agreeing(runs, BASELINE, greedy),
        "tree_sweep": sweep,
        "definitions": {
            "speedup": "tokens/s of the method / tokens/s of hf on the same prompts, where "
            "tokens/s = total new tokens / total wall time",
            "tau": "mean tokens emitted per verification forward over all steps (hf: 1 by "
            "construction; hf-pld: per base-model forward, its prefill included)",
            "acceptance_by_depth": "d=1..depth: fraction of steps whose accept length > d",
            "ttft_s": "mean seconds from the call to the first new token (prefill included)",
            "tpot_s": "sum(wall - ttft) / sum(new tokens - 1)",
            "peak_mem_bytes": MEMORY_SOURCES[PeakMemory(model.device).source],
            "agreeing": "the prompts on which every greedy method's tokens equal hf's; their "
            "figures compare the methods on the same text (bf16 rounding lets texts drift apart)",
        },
    }


def _stamp(args, model, runners, load_start) -> dict:
    trees = {
        m.label: {
            "name": repo_relative(m.tree) if m.tree and os.path.isabs(m.tree) else m.tree,
            "nodes": m.engine.tree.num_nodes,
            "depth": m.engine.tree.max_depth,
        }
        for m in runners
        if m.engine is not None
    }
    return {
        "model": args.model,
        **environment(model.device, model.dtype, load_start[0]),
        "heads": heads_label(str(args.heads), args.model),
        "trees": trees,
        "temperature": args.temperature if SAMPLED.keys() & set(_split(args.methods)) else None,
        "seed": 0 if args.seed is None else args.seed,
        "pld_num_tokens": PLD_TOKENS,
    }


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


if __name__ == "__main__":
    sys.exit(main())
