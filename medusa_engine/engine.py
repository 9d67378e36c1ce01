"""Assemble an engine: an `EngineConfig` (or in-memory model + heads) -> `MedusaGenerator`.

The composition root: the only place that knows which model class, heads format and tree spec
go together. The decode loop itself (`generate.py`) takes resolved objects only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medusa_engine.config import EngineConfig, SamplingConfig
from medusa_engine.drafters import Drafter, make_drafter
from medusa_engine.eagle3 import Eagle3Heads
from medusa_engine.generate import MedusaGenerator
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import load_heads
from medusa_engine.model import CausalLM
from medusa_engine.models import ModelSource, resolve_model
from medusa_engine.recurrent_heads import RecurrentHeads
from medusa_engine.tree_spec import TreeSpec, parse_tree
from medusa_engine.trees import DEFAULT_TREE

Progress = Callable[[str], None]


def build_engine(
    model: CausalLM,
    heads: MedusaHeads | RecurrentHeads | Eagle3Heads | Drafter | None,
    tree: TreeSpec = "plain",
    sampling: SamplingConfig | None = None,
    *,
    lookup: int = 0,
    static: bool = False,
) -> MedusaGenerator:
    """An engine over a loaded model: heads (or a drafter) and a tree spec resolved for them."""
    drafter = (
        make_drafter(heads, model)
        if isinstance(heads, (MedusaHeads, RecurrentHeads, Eagle3Heads))
        else heads
    )
    return MedusaGenerator(model, drafter, parse_tree(tree, drafter), sampling, lookup, static)


def heads_folder(heads: str, source: ModelSource) -> Path | None:
    """`--heads`: `none` -> None, `auto` -> the alias's bundled heads (if any), else the path."""
    if heads == "none":
        return None
    if heads == "auto":
        return source.bundled_heads
    return Path(heads)


def tree_value(tree: str, heads_dir: Path | None) -> str:
    """`--tree` with `default` resolved: the heads' own tree.json if they ship one, else
    `DEFAULT_TREE`. Other values (including `auto`) are returned as given."""
    if tree != "default":
        return tree
    bundled = heads_dir / "tree.json" if heads_dir is not None else None
    return str(bundled) if bundled is not None and bundled.is_file() else DEFAULT_TREE


def load_engine(config: EngineConfig, progress: Progress | None = None) -> MedusaGenerator:
    """Load the model and heads of `config` and resolve its tree (`auto`: tuned on first use,
    then cached; `progress` hears about the tuning)."""
    from medusa_engine.hf_adapter import HFModel, quiet_transformers

    source = resolve_model(config.model)
    heads_dir = heads_folder(config.heads, source)
    heads = load_heads(heads_dir) if heads_dir is not None else None
    tree = tree_value(config.tree, heads_dir)
    quiet_transformers()
    model = HFModel.load(
        source, dtype=config.dtype, device=config.device, attention=config.attention
    )
    engine = build_engine(
        model,
        heads,
        "plain" if tree == "auto" else tree,
        config.sampling,
        lookup=config.lookup,
        static=config.static_step,
    )
    if tree == "auto" and engine.drafter is not None:
        from medusa_engine.tune import auto_tree

        tuned = auto_tree(engine, heads_dir, progress or (lambda message: None))
        engine.set_tree(parse_tree(tuned.spec(), engine.drafter))
    return engine
