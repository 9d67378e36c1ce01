"""Atomic training checkpoints and the small EMA-only export.

* `save_atomic(obj, path)`: torch.save to a temporary file in the same folder, fsync, then
  `os.replace`, so a crash never leaves a half-written checkpoint behind.
* `export_ema` / `load_dit`: EMA weights only, as safetensors, with the DiT config and process
  name in the metadata; `dtype` (fp32 by default, bf16/fp16 to halve the size) is the storage type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_ext.config import DiTConfig
from diffusion_ext.dit import DiT


def _replace_atomically(write: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save(obj) to `path` atomically."""
    _replace_atomically(lambda tmp: torch.save(obj, tmp), Path(path))


def load_state(path: str | Path) -> dict[str, Any]:
    """A training state written by `save_atomic` (our own files: full unpickling)."""
    return torch.load(path, map_location="cpu", weights_only=False)


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
    _replace_atomically(lambda tmp: save_file(tensors, tmp, metadata=meta), Path(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_dit(path: str | Path) -> tuple[DiT, str]:
    """(DiT in eval mode with fp32 weights, process name) from an `export_ema` file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = read_metadata(path)
    if "dit_config" not in meta or "process" not in meta:
        raise ValueError(f"{path} is not a diffusion_ext EMA export (metadata missing)")
    model = DiT(DiTConfig(**json.loads(meta["dit_config"])))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval(), meta["process"]
