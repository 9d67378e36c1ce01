"""The `medusa-engine` command: thin argparse front ends over the library.

Bad input (unknown model, missing or mismatched heads, invalid tree, prompt too long) ends with a
one-line `medusa-engine: error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from attention.api import BACKENDS
from medusa_engine.config import ACCEPTANCE_RULES, SamplingConfig
from medusa_engine.models import DEFAULT_MODEL, ModelNotFoundError
from medusa_engine.trees import DEFAULT_LOOKUP, DEFAULT_TREE

ATTENTION_CHOICES = ("hf", *BACKENDS)  # as hf_adapter.ATTENTION_CHOICES, without transformers

EXIT_USAGE = 2


class CLIError(Exception):
    """An error to report in one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from medusa_engine.heads import HeadsError
    from medusa_engine.hf_adapter import ContextOverflowError
    from medusa_engine.tree import InvalidTreeError

    return (CLIError, ModelNotFoundError, HeadsError, InvalidTreeError, ContextOverflowError,
            ValueError, OSError)  # fmt: skip


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model with heads."""
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
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
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
        temperature=args.temperature, acceptance=args.acceptance, seed=seed,
        top_k=args.top_k, top_p=args.top_p,
    )  # fmt: skip


def load_engine(args: argparse.Namespace):
    """Model + heads + tree + sampling from parsed flags -> a `MedusaGenerator`."""
    from medusa_engine.generate import MedusaGenerator
    from medusa_engine.heads import load_heads
    from medusa_engine.hf_adapter import HFModel, quiet_transformers
    from medusa_engine.models import resolve_model

    if args.max_new_tokens <= 0:
        raise CLIError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.lookup < 0:
        raise CLIError(f"--lookup must be >= 0, got {args.lookup}")
    if args.static_step and (args.lookup or args.attention == "hf" or args.temperature > 0):
        raise CLIError(
            "--static-step needs greedy decoding (--temperature 0), --lookup 0 and one of our "
            "attention backends (--attention sdpa, flex, triton or reference)"
        )
    sampling = sampling_config(args, args.seed)
    source = resolve_model(args.model)
    heads_dir: Path | None
    if args.heads == "none":
        heads_dir = None
    elif args.heads == "auto":
        heads_dir = source.bundled_heads
    else:
        heads_dir = Path(args.heads)
    heads = load_heads(heads_dir) if heads_dir is not None else None
    if args.tree == "default":
        bundled = heads_dir / "tree.json" if heads_dir is not None else None
        args.tree = str(bundled) if bundled is not None and bundled.is_file() else DEFAULT_TREE
    tree = "plain" if args.tree == "auto" else _tree_arg(args.tree)
    quiet_transformers()
    model = HFModel.load(source, dtype=args.dtype, device=args.device, attention=args.attention)
    engine = MedusaGenerator(
        model, heads, tree, sampling, lookup=args.lookup, static=args.static_step
    )
    if args.tree == "auto" and heads is not None:
        from medusa_engine.tune import auto_tree

        engine.set_tree(auto_tree(engine, heads_dir, _progress).tree)
    return engine


def _progress(message: str) -> None:
    print(f"medusa-engine: {message}", file=sys.stderr, flush=True)


def cmd_tune_tree(args: argparse.Namespace) -> int:
    from medusa_engine.tree import tree_from_name
    from medusa_engine.trees import TREE_PRESETS
    from medusa_engine.tune import score_tree, tune

    args.tree = "plain"
    engine = load_engine(args)
    if engine.drafter is None:
        raise CLIError("tune-tree needs heads: pass --heads DIR (or a model with bundled heads)")
    tuned, calibration = tune(engine, progress=_progress, new_tokens=args.calibration_tokens)
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
    if args.out:
        tuned.save(Path(args.out))
        _progress(f"wrote {args.out} (use it with --tree {args.out})")
    return 0


def _tree_arg(value: str):
    """A preset / `auto` / `dynamic:...` name as given, or the paths of inline JSON or a file."""
    if value.lstrip().startswith("["):
        return _tree_json(value, "--tree")
    path = Path(value)
    if value.endswith(".json") or path.is_file():
        if not path.is_file():
            raise CLIError(f"tree file not found: {path}")
        return _tree_json(path.read_text(), str(path))
    return value


def _tree_json(text: str, where: str):
    """Paths (list of rank tuples) from a JSON list, or a `tune-tree --out` record."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(f"{where} is not valid JSON: {err}") from None
    if isinstance(data, dict) and data.get("dynamic_nodes"):  # `tune-tree --out`: dynamic won
        return f"dynamic:{int(data['dynamic_nodes'])}"
    paths = data.get("paths", data) if isinstance(data, dict) else data
    if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
        raise CLIError(f"{where} must hold a list of paths (lists of ranks)")
    return [tuple(p) for p in paths]


def encode_prompt(tokenizer, text: str, raw: bool) -> list[int]:
    """Token ids of `text`, wrapped in the chat template when the tokenizer has one."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(text)["input_ids"])


def summary_line(result) -> str:
    return (f"[{len(result.token_ids)} new tokens, {result.steps} steps, "
            f"τ={result.mean_accepted:.2f}, {result.tokens_per_s:.1f} tok/s, "
            f"finish={result.finish_reason}]")  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    from medusa_engine.generate import GenerationResult

    engine = load_engine(args)
    tokenizer = engine.model.tokenizer
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.raw)
    result = GenerationResult()

    def text_of(token_ids: list[int]) -> str:
        """The reply so far, cut before the first stop string."""
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in args.stop if s in text]
        return text[: min(cuts)] if cuts else text

    stop = (lambda out: any(s in tokenizer.decode(out, skip_special_tokens=True) for s in args.stop)
            ) if args.stop else None  # fmt: skip
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
    print(json.dumps({
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
    }))  # fmt: skip
    return 0


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
    tune_p.set_defaults(func=cmd_tune_tree)
    bench = sub.add_parser("bench", help="throughput and acceptance benchmark against baselines")
    _add_lazy_arguments(bench, "eval.harness")
    bench.set_defaults(func=_lazy("eval.harness", "run"))
    train = sub.add_parser("train-heads", help="train Medusa heads on a model's hidden states")
    _add_lazy_arguments(train, "medusa_engine.train_heads")
    train.set_defaults(func=_lazy("medusa_engine.train_heads", "run"))
    chat = sub.add_parser("chat", help="multi-turn chat (the default model with its heads)")
    add_model_args(chat)
    chat.set_defaults(func=_lazy("medusa_engine.chat", "run"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
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
