"""Training checkpoints and the small EMA-only export: safetensors + JSON, nothing unpickled.

* `save_state(state, path)` / `load_state(path)`: the whole training state (model, EMA, optimizer,
  loss scaler, RNG, step, config). Every tensor is stored under its path in the state (e.g.
  `optimizer/state/0/exp_avg`); everything else is JSON in the file's metadata, each tensor
  replaced by `{"__tensor__": key}`. Tuples and dicts with int keys (the optimizer's per-parameter
  state) are tagged so they come back as they were; JSON floats round-trip bit for bit (`repr`),
  so a resumed run is bit-exact. Loading parses a JSON header and raw tensor bytes: a crafted file
  cannot run code. Pickles are never loaded: `torch.load(weights_only=True)` would refuse them
  too, but torch < 2.6 (which pyproject.toml allows) had a code-execution hole in exactly that
  path (CVE-2025-32434). The encoding is `attention.state_files`, shared with
  `medusa_engine/training/checkpoint.py`.
* `export_ema` / `load_dit`: EMA weights only, as safetensors, with the DiT config and process
  name in the metadata; `dtype` (fp32 by default, bf16/fp16 to halve the size) is the storage type.
  `load_dit` checks the config against the file's tensor shapes on the meta device before it
  allocates anything, so a bad or crafted file is a ValueError, not a giant allocation.

Writes go to a temporary file in the same folder, fsync, then `os.replace`: a crash never leaves a
half-written file behind, and the previous one stays intact.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from attention.state_files import atomic_write, pack_state, read_state
from diffusion_ext.config import PROCESSES, DiTConfig
from diffusion_ext.dit import DiT

STATE_FORMAT = "diffusion_ext-train-state"
STATE_VERSION = "1"


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` (nested dicts / lists / tuples of tensors and JSON scalars) atomically."""
    tensors, meta = pack_state(state, STATE_FORMAT, STATE_VERSION)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_state(path: str | Path) -> dict[str, Any]:
    """The state `save_state` wrote (tensors on the CPU); ValueError for any other file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    try:
        return read_state(path, STATE_FORMAT, STATE_VERSION)
    except ValueError as err:
        raise ValueError(
            f"cannot read training checkpoint {path} (safetensors + JSON from this version of "
            f"diffusion_ext.train; pickles are never loaded): {err}"
        ) from None


def export_ema(
    ema: nn.Module,
    config: DiTConfig,
    process: str,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, str] | None = None,
) -> None:
    """EMA weights as safetensors (atomic); metadata: `dit_config` (JSON), `process`, `extra`."""
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in ema.state_dict().items()}
    meta = {"dit_config": json.dumps(dataclasses.asdict(config)), "process": process}
    meta.update(extra or {})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, tensor shapes) of a safetensors file, reading only its header; ValueError if
    `path` is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            return dict(f.metadata() or {}), shapes
    except Exception as err:  # SafetensorError (a plain Exception), OSError, ...
        raise ValueError(f"{path} is not a safetensors file: {err}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    return read_header(path)[0]


def load_dit(path: str | Path) -> tuple[DiT, str]:
    """(DiT in eval mode with fp32 weights, process name) from an `export_ema` file.

    FileNotFoundError if there is no file; ValueError for anything that is not an intact export.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta, shapes = read_header(path)
    if "dit_config" not in meta or "process" not in meta:
        raise ValueError(f"{path} is not a diffusion_ext EMA export (metadata missing)")
    if meta["process"] not in PROCESSES:
        raise ValueError(f"{path}: unknown process {meta['process']!r} in its metadata")
    try:
        config = DiTConfig(**json.loads(meta["dit_config"]))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: bad dit_config in its metadata: {err}") from None
    if config.depth > len(shapes):  # each block holds several tensors; bounds the loop below
        raise ValueError(f"{path}: dit_config says depth {config.depth}, the file is too small")
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: tuple(v.shape) for k, v in DiT(config).state_dict().items()}
    if expected != shapes:
        diff = sorted(set(expected.items()) ^ set(shapes.items()))[:3]
        raise ValueError(f"{path}: tensors do not match its dit_config, e.g. {diff}")
    model = DiT(config)
    try:
        state = {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as err:  # the header was fine; the data behind it was not
        raise ValueError(f"{path}: cannot read its tensors: {err}") from None
    model.load_state_dict(state)
    return model.eval(), meta["process"]


def export_weights(
    module: nn.Module,
    kind: str,
    config: Any,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, str] | None = None,
) -> None:
    """`module`'s weights as safetensors (atomic) for the models beside the DiT (`mmdit`,
    `controlnet`); metadata: `kind`, `config` (JSON of the dataclass `config`), `extra`."""
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    meta = {"kind": kind, "config": json.dumps(dataclasses.asdict(config))}
    meta.update(extra or {})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_weights(
    path: str | Path, kind: str, build: Callable[[dict[str, Any]], nn.Module]
) -> tuple[nn.Module, dict[str, str]]:
    """(module with fp32 weights in eval mode, metadata) from an `export_weights` file of `kind`.

    `build(config_dict)` makes the module (ValueError / TypeError for a bad config); it is first
    built on the meta device and its tensor shapes compared with the file's, so a bad or crafted
    file is a ValueError before anything is allocated.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta, shapes = read_header(path)
    if meta.get("kind") != kind or "config" not in meta:
        raise ValueError(f"{path} is not a diffusion_ext {kind} export (kind {meta.get('kind')!r})")
    try:
        config = json.loads(meta["config"])
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        with torch.device("meta"):  # shapes only: nothing is allocated
            expected = {k: tuple(v.shape) for k, v in build(config).state_dict().items()}
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: bad config in its metadata: {err}") from None
    if expected != shapes:
        diff = sorted(set(expected.items()) ^ set(shapes.items()))[:3]
        raise ValueError(f"{path}: tensors do not match its config, e.g. {diff}")
    module = build(config)
    try:
        state = {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as err:  # the header was fine; the data behind it was not
        raise ValueError(f"{path}: cannot read its tensors: {err}") from None
    module.load_state_dict(state)
    return module.eval(), meta
