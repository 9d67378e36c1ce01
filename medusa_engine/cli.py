"""The `medusa-engine` command: thin argparse front ends over the library.

Bad input (unknown model, missing or mismatched heads, invalid tree, prompt too long) ends with a
one-line `medusa-engine: error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from medusa_engine.config import (
    ACCEPTANCE_RULES,
    ATTENTION_CHOICES,
    DEFAULT_LOOKUP,
    DTYPE_CHOICES,
    EngineConfig,
    SamplingConfig,
)
from medusa_engine.models import DEFAULT_MODEL, ModelNotFoundError
from medusa_engine.trees import DEFAULT_TREE

EXIT_USAGE = 2
COMMANDS_GROUP = "medusa_engine.commands"  # entry points adding subcommands (eval adds `bench`)


class CLIError(Exception):
    """An error to report in one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from medusa_engine.config import HeadsError
    from medusa_engine.model import ContextOverflowError
    from medusa_engine.tree import InvalidTreeError

    return (
        CLIError,
        ModelNotFoundError,
        HeadsError,
        InvalidTreeError,
        ContextOverflowError,
        ValueError,
        OSError,
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model with heads (`EngineConfig`'s fields).

    Long on purpose: one flat list of flags, each with its help text, reads better than pieces."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="alias (stories260k, smollm2-135m-instruct), HF folder, .gguf file or hub id",
    )
    p.add_argument(
        "--heads",
        default="auto",
        help="heads folder; 'auto' = the model's bundled heads, 'none' = plain decoding",
    )
    p.add_argument(
        "--tree",
        default="default",
        help="tree preset name, a JSON file of paths or the paths inline ('[[0],[1],[0,0]]'), 'auto' "
        "(tuned for this machine), "
        "'dynamic:N[:TOPK[:BEAM[:DEPTH]]]' (N nodes shaped each step by the heads' confidence, as in "
        f"EAGLE-2), or 'default': the heads' own tree.json if they have one, else {DEFAULT_TREE}",
    )
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES))
    p.add_argument(
        "--attention",
        default="hf",
        choices=list(ATTENTION_CHOICES),
        help="'hf': the model's own attention + DynamicCache; else our backend + static cache",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (output identical to greedy decoding); > 0 samples (see --acceptance)",
    )
    p.add_argument(
        "--acceptance",
        default="lossless",
        choices=list(ACCEPTANCE_RULES),
        help="when sampling: 'lossless' (default; rejection sampling of the drafts: the output "
        "is distributed exactly as plain sampling at --temperature) or 'typical' (Medusa's "
        "typical acceptance: keeps more drafts, but changes the distribution)",
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="when sampling: only the K likeliest tokens (0 = all)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="when sampling: only the likeliest tokens holding this much probability (nucleus; "
        "1 = all); applied after --top-k, and lossless acceptance stays exact for the result",
    )
    p.add_argument(
        "--lookup",
        type=int,
        default=DEFAULT_LOOKUP,
        help="a prompt-lookup branch of up to N nodes under the tree's root: the tokens that "
        "followed the text's last n-gram earlier on, N / N/2 / N/4 of them for a 3 / 2 / 1-gram "
        f"match, none without a match (default {DEFAULT_LOOKUP}; 0 = none)",
    )
    p.add_argument(
        "--static-step",
        action="store_true",
        help="run each verification step with static shapes and device-side bookkeeping, "
        "captured as one CUDA graph on a GPU (greedy; needs --attention sdpa/flex/triton and "
        "--lookup 0)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)


def sampling_config(args: argparse.Namespace, seed: int | None) -> SamplingConfig:
    """The sampling flags as a config (a bad value raises ValueError: a one-line error)."""
    return SamplingConfig(
        temperature=args.temperature,
        acceptance=args.acceptance,
        seed=seed,
        top_k=args.top_k,
        top_p=args.top_p,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The model flags (`add_model_args`) as the one engine config, validated once."""
    return EngineConfig(
        model=args.model,
        heads=args.heads,
        tree=args.tree,
        dtype=args.dtype,
        attention=args.attention,
        device=args.device,
        lookup=args.lookup,
        static_step=args.static_step,
        sampling=sampling_config(args, args.seed),
        max_new_tokens=args.max_new_tokens,
    )


def progress(message: str) -> None:
    """Progress of long steps (tuning), on stderr."""
    print(f"medusa-engine: {message}", file=sys.stderr, flush=True)


def cmd_tune_tree(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from medusa_engine.engine import load_engine
    from medusa_engine.tree import tree_from_name
    from medusa_engine.trees import TREE_PRESETS
    from medusa_engine.tune import score_tree, tune

    if args.batch_sizes:
        return cmd_tune_batch(args)
    if args.tree != "default":
        raise CLIError("tune-tree chooses the tree itself: drop --tree")
    if args.calibration_tokens < 1:
        raise CLIError(f"--calibration-tokens must be positive, got {args.calibration_tokens}")
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_writable_file(out, "--out")
    engine = load_engine(replace(engine_config(args), tree="plain"))
    if engine.drafter is None:
        raise CLIError("tune-tree needs heads: pass --heads DIR (or a model with bundled heads)")
    tuned, calibration = tune(engine, progress=progress, new_tokens=args.calibration_tokens)
    print(f"{'tree':<16}{'nodes':>6}{'pred. tau':>10}{'step ms':>9}{'tau/ms':>9}")
    auto_nodes = tuned.dynamic_nodes or len(tuned.paths) + 1
    rows = {"auto": (auto_nodes, tuned.predicted_tau, tuned.step_ms)}
    if tuned.dynamic_nodes:
        rows["best static"] = (
            len(tuned.paths) + 1,
            *score_tree(tuned.paths, calibration, tuned.latency_ms),
        )
    for name in TREE_PRESETS:
        tree = tree_from_name(name, engine.drafter.num_heads)
        paths = [p for p in TREE_PRESETS[name] if len(p) <= tree.num_heads]
        rows[name] = (len(paths) + 1, *score_tree(paths, calibration, tuned.latency_ms))
    for n, tau in tuned.dynamic_tau.items():
        rows[f"dynamic:{n}"] = (n, tau, tuned.dynamic_latency_ms[n])
    for name, (nodes, tau, ms) in rows.items():
        print(f"{name:<16}{nodes:>6}{tau:>10.3f}{ms:>9.2f}{tau / ms:>9.4f}")
    if out is not None:
        tuned.save(out)
        progress(f"wrote {out} (use it with --tree {out})")
    return 0


def cmd_tune_batch(args: argparse.Namespace) -> int:
    """`tune-tree --batch-sizes`: the best (tree, lookup) per batch size, measured."""
    from dataclasses import replace

    from medusa_engine.batch_plans import describe, parse_sizes, save_plans, tune_plans
    from medusa_engine.calibration import calibration_prompts
    from medusa_engine.engine import heads_folder, load_engine, tree_value
    from medusa_engine.models import resolve_model

    sizes = parse_sizes(args.batch_sizes, "--batch-sizes")
    if sizes[0] != 1:
        raise CLIError("--batch-sizes must include 1 (the plan for a lone request)")
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_writable_file(out, "--out")
    config = engine_config(args)
    if config.attention == "hf":
        config = replace(config, attention="sdpa")  # batched verification runs on our attention
    engine = load_engine(config)
    if engine.drafter is None:
        raise CLIError("tune-tree needs heads: pass --heads DIR (or a model with bundled heads)")
    own = tree_value(args.tree, heads_folder(config.heads, resolve_model(config.model)))
    # Batch 1 wants the heads' own tree and the long lookup branch; larger batches pay for
    # every row's extra node, so smaller trees and shorter branches are tried too.
    candidates = list(
        dict.fromkeys(
            [("plain", 0), (own, 0), (own, config.lookup), ("cpu_8", 0)]
            + [(chain, lk) for chain in ("chain_2", "chain_3") for lk in (0, 4)]
        )
    )
    prompts = calibration_prompts(engine.model.tokenizer)
    chosen, measured = tune_plans(
        engine, prompts, sizes, candidates, args.calibration_tokens, progress
    )
    print(describe({b: {"tree": t, "lookup": lk} for b, (t, lk) in chosen.items()}))
    if out is not None:
        save_plans(out, chosen, measured)
        progress(f"wrote {out} (use it with serve/bench --batch-plans {out})")
    return 0


def _check_text(text: str, flag: str) -> None:
    """Command-line bytes that are not UTF-8 arrive as lone surrogates: refuse them in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CLIError(f"{flag} is not valid UTF-8 text") from None


def _check_writable_file(path: Path, flag: str) -> None:
    """Refuse an output file that cannot be written, before any long work."""
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CLIError(f"{flag} {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CLIError(f"{flag} {path} is not writable")


def summary_line(result) -> str:
    return (
        f"[{len(result.token_ids)} new tokens, {result.steps} steps, "
        f"τ={result.mean_accepted:.2f}, {result.tokens_per_s:.1f} tok/s, "
        f"finish={result.finish_reason}]"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from medusa_engine.engine import load_engine
    from medusa_engine.generate import GenerationResult
    from medusa_engine.hf_adapter import encode_prompt

    _check_text(args.prompt, "--prompt")
    engine = load_engine(engine_config(args), progress)
    tokenizer = engine.model.tokenizer
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.raw)
    result = GenerationResult()

    def text_of(token_ids: list[int]) -> str:
        """The reply so far, cut before the first stop string."""
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in args.stop if s in text]
        return text[: min(cuts)] if cuts else text

    stop = (
        (lambda out: any(s in tokenizer.decode(out, skip_special_tokens=True) for s in args.stop))
        if args.stop
        else None
    )
    stream = engine.stream(prompt_ids, args.max_new_tokens, result=result, stop=stop)
    if args.json:
        for _ in stream:
            pass
    else:
        printed = ""
        for _ in stream:  # re-decode the whole reply so multi-token characters print correctly
            text = text_of(result.token_ids)
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
        sys.stdout.write("\n")
        print(summary_line(result), file=sys.stderr)
        return 0
    print(
        json.dumps(
            {
                "text": text_of(result.token_ids),
                "token_ids": result.token_ids,
                "new_tokens": len(result.token_ids),
                "steps": result.steps,
                "mean_accepted": result.mean_accepted,
                "tokens_per_s": result.tokens_per_s,
                "accepted_lengths": result.accepted_lengths,
                "finish_reason": result.finish_reason,
                "prefill_s": result.prefill_s,
                "total_s": result.total_s,
                "model": engine.model.name,
                "tree_nodes": engine.tree.num_nodes,
            }
        )
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from medusa_engine.chat import ChatLoop
    from medusa_engine.engine import load_engine

    config = engine_config(args)
    engine = load_engine(config, progress)
    if isinstance(sys.stdin, io.TextIOWrapper):  # bad bytes reach the loop as one bad line
        sys.stdin.reconfigure(errors="surrogateescape")
    return ChatLoop(engine, config.max_new_tokens, sys.stdin, sys.stdout).run()


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command implemented in another module, imported only when run."""

    def call(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), name)(args))

    return call


def _add_lazy_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    import importlib

    importlib.import_module(module).add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medusa-engine", description=__doc__.split("\n")[0])
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log at INFO level; show tracebacks instead of one-line errors",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a reply to one prompt")
    add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the reply contains TEXT (repeatable); the text is cut there",
    )
    gen.set_defaults(func=cmd_generate)
    tune_p = sub.add_parser("tune-tree", help="choose the tree for this machine, model and heads")
    add_model_args(tune_p)
    tune_p.add_argument("--out", default=None, help="write the tuned tree (JSON) here")
    tune_p.add_argument("--calibration-tokens", type=int, default=64)
    tune_p.add_argument(
        "--batch-sizes",
        default=None,
        help="e.g. 1,2,4,8: measure and pick a tree and lookup per batch size for batched "
        "serving (writes --out as batch plans for serve / bench --concurrency)",
    )
    tune_p.set_defaults(func=cmd_tune_tree)
    train = sub.add_parser("train-heads", help="train Medusa heads on a model's hidden states")
    _add_lazy_arguments(train, "medusa_engine.training.cli")
    train.set_defaults(func=_lazy("medusa_engine.training.cli", "run"))
    export = sub.add_parser("export-heads", help="write heads in a serving engine's layout")
    _add_lazy_arguments(export, "medusa_engine.export")
    export.set_defaults(func=_lazy("medusa_engine.export", "run"))
    chat = sub.add_parser("chat", help="multi-turn chat (the default model with its heads)")
    add_model_args(chat)
    chat.set_defaults(func=cmd_chat)
    for entry in entry_points(group=COMMANDS_GROUP):  # e.g. `bench`, added by the eval package
        try:
            register = entry.load()
        except ImportError:  # its package is not installed here: the command is absent
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except _user_errors() as err:
        if args.verbose:  # -v: the full traceback, for bug reports
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"medusa-engine: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
