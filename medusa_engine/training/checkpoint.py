"""Training checkpoints that load as data only: one safetensors file, JSON inside, no pickle.

Every tensor of the training state (heads, optimizer moments, torch RNG states) is stored under a
flat key (its path in the state, e.g. `optimizer/state/0/exp_avg`); everything else (step,
scheduler, loss scaler, Python RNG, config) is JSON in the file's metadata, with each tensor
replaced by `{"__tensor__": key}`. Reading one parses a JSON header and raw tensor bytes, so a
crafted file cannot run code: anything else, a pickle included (older versions wrote
`torch.save` pickles), is refused with a `TrainError`.

The JSON encoding (exact floats, tagged tuples and integer-keyed dicts) is
`attention.state_codec`, shared with the DiT training checkpoints. Writes go to a temp file that is then renamed (`atomic_write`): a write killed midway
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attention.state_codec import decode_state, encode_state
from medusa_engine.atomic import atomic_write
from medusa_engine.training.config import TrainError

FORMAT = "medusa-engine-train-state"
VERSION = "1"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts / lists / tuples of tensors and JSON scalars) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(encode_state(state, tensors, ""))
    metadata = {"format": FORMAT, "version": VERSION, "state": header}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state `save_checkpoint` wrote (tensors on the CPU); `TrainError` for any other file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or "state" not in metadata:
                raise ValueError("no training state in it")
            if metadata.get("version") != VERSION:
                raise ValueError(f"format version {metadata.get('version')}, not {VERSION}")
            names = f.keys()  # a safetensors file handle is not iterable itself
            tensors = {name: f.get_tensor(name) for name in names}
        state = decode_state(json.loads(metadata["state"]), tensors)
    except Exception as err:  # safetensors and json raise several types for a foreign file
        raise TrainError(
            f"cannot read checkpoint {path}: not a train-heads checkpoint of this version "
            f"(safetensors + JSON; older pickle checkpoints are never loaded): {err}"
        ) from None
    if not isinstance(state, dict):
        raise TrainError(f"cannot read checkpoint {path}: its state is not a mapping")
    return state


def rng_state() -> dict[str, Any]:
    """Python's and torch's RNG states (every CUDA device's too, when there is one)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
