"""Training checkpoints that load as data only: one safetensors file, JSON inside, no pickle.

Every tensor of the training state (heads, optimizer moments, torch RNG states) is stored under a
flat key (its path in the state, e.g. `optimizer/state/0/exp_avg`); everything else (step,
scheduler, loss scaler, Python RNG, config) is JSON in the file's metadata, with each tensor
replaced by `{"__tensor__": key}`. Reading one parses a JSON header and raw tensor bytes, so a
crafted file cannot run code: anything else, a pickle included (older versions wrote
`torch.save` pickles), is refused with a `TrainError`.

The encoding (exact floats, tagged tuples and integer-keyed dicts) and the atomic write (a temp
file renamed over the checkpoint: a write killed midway leaves the previous one intact) are
`attention.state_files`, shared with the DiT training checkpoints.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from attention.state_files import atomic_write, pack_state, read_state
from medusa_engine.training.config import TrainError

FORMAT = "medusa-engine-train-state"
VERSION = "1"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts / lists / tuples of tensors and JSON scalars) atomically."""
    tensors, metadata = pack_state(state, FORMAT, VERSION)
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state `save_checkpoint` wrote (tensors on the CPU); `TrainError` for any other file."""
    try:
        return read_state(path, FORMAT, VERSION)
    except ValueError as err:
        raise TrainError(
            f"cannot read checkpoint {path}: not a train-heads checkpoint of this version "
            f"(safetensors + JSON; older pickle checkpoints are never loaded): {err}"
        ) from None


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
