"""A/B of two commits of the engine: identical outputs (fp32) and speed (bf16), one script.

    python ab.py outputs --out old.json        # run from a checkout of each commit
    python ab.py compare old.json new.json
    python ab.py speed --old DIR --new DIR --rounds 3 --out speed.json

`outputs`: 20 MT-Bench first turns x 128 new tokens in fp32 on SmolLM2-135M-Instruct with its
bundled heads, for a static tree (the heads' tree.json, no lookup), a dynamic tree (dynamic:16,
no lookup), the lookup branch (tree.json + lookup 16: the chat default), and sampling with a fixed
seed (T 0.7, lossless and typical acceptance). `speed`: the default chat config (bf16) on 24
MT-Bench first turns x 256 tokens, one subprocess per (round, commit), old and new alternating.
The script imports whichever `medusa_engine` is first on sys.path (the checkout it runs from).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "static": dict(tree="default", lookup=0, temperature=0.0),
    "dynamic": dict(tree="dynamic:16", lookup=0, temperature=0.0),
    "lookup": dict(tree="default", lookup=16, temperature=0.0),
    "lossless": dict(tree="default", lookup=16, temperature=0.7, acceptance="lossless"),
    "typical": dict(tree="default", lookup=16, temperature=0.7, acceptance="typical"),
}


def make_engine(dtype: str, tree: str, lookup: int, temperature: float, acceptance="lossless"):
    """The engine as the CLI builds it, through whichever API this checkout has."""
    flags = [
        "--dtype",
        dtype,
        "--tree",
        tree,
        "--lookup",
        str(lookup),
        "--temperature",
        str(temperature),
        "--acceptance",
        acceptance,
        "--seed",
        "0",
    ]
    import importlib

    cli = importlib.import_module("medusa_engine.cli")
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", *flags])
    if hasattr(cli, "engine_config"):  # the one engine config (new layout)
        engine = importlib.import_module("medusa_engine.engine")
        return engine.load_engine(cli.engine_config(args))
    return cli.load_engine(args)


def prompts(n: int) -> list[str]:
    from eval.prompts import load_prompts

    return [p.text for p in load_prompts("mt_bench")[:n]]


def encode(engine, text: str) -> list[int]:
    import importlib

    tokenizer = engine.model.tokenizer
    try:  # the one chat encoding (new layout)
        return importlib.import_module("medusa_engine.hf_adapter").encode_prompt(tokenizer, text)
    except AttributeError:
        return importlib.import_module("medusa_engine.cli").encode_prompt(tokenizer, text, False)


def reseed(engine, seed: int) -> None:
    engine.generator.manual_seed(seed)


def cmd_outputs(args) -> int:
    import torch

    torch.set_num_threads(2)
    texts = prompts(20)
    out: dict[str, list[list[int]]] = {}
    for name, cfg in CONFIGS.items():
        engine = make_engine("fp32", **cfg)
        ids = [encode(engine, t) for t in texts]
        rows = []
        for i, prompt_ids in enumerate(ids):
            reseed(engine, 1000 + i)
            rows.append(engine.generate(prompt_ids, 128).token_ids)
        out[name] = rows
        print(name, sum(map(len, rows)), "tokens", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(out))
    return 0


def cmd_compare(args) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    bad = 0
    for name in a:
        same = sum(x == y for x, y in zip(a[name], b[name]))
        bad += len(a[name]) - same
        print(f"{name:<10} {same}/{len(a[name])} identical, {sum(map(len, a[name]))} tokens")
    return 1 if bad else 0


def cmd_speed_one(args) -> int:
    """One timed run of the default chat config (bf16): prints one JSON line."""
    import torch

    torch.set_num_threads(2)
    engine = make_engine("bf16", "default", 16, 0.0)
    ids = [encode(engine, t) for t in prompts(24)]
    engine.generate(ids[0][:16], 8)  # warm-up
    tokens = steps = 0
    start = time.perf_counter()
    for p in ids:
        result = engine.generate(p, 256)
        tokens += len(result.token_ids)
        steps += result.steps
    wall = time.perf_counter() - start
    print(
        json.dumps(
            {
                "tokens": tokens,
                "steps": steps,
                "wall_s": wall,
                "tok_s": tokens / wall,
                "load": os.getloadavg()[0],
            }
        )
    )
    return 0


def cmd_speed(args) -> int:
    runs = []
    for r in range(args.rounds):
        for label, checkout in (("old", args.old), ("new", args.new)):
            env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
            proc = subprocess.run(
                [sys.executable, __file__, "speed-one"],
                cwd=checkout,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            row = {"round": r, "commit": label, **json.loads(proc.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            runs.append(row)
    Path(args.out).write_text(json.dumps(runs, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("outputs")
    o.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    sub.add_parser("speed-one")
    s = sub.add_parser("speed")
    s.add_argument("--old", required=True)
    s.add_argument("--new", required=True)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--out", required=True)
    args = p.parse_args()
    return {
        "outputs": cmd_outputs,
        "compare": cmd_compare,
        "speed-one": cmd_speed_one,
        "speed": cmd_speed,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
