"""Files the training loops of both engines write: atomic writes and training states as JSON +
named tensors (what a checkpoint stores without pickle). Shared by the heads' and the DiT's
training, beside the precision runtime.

`atomic_write(dest, write)`: a write killed midway never leaves a half-written file at `dest`.
`pack_state` / `read_state`: a state as safetensors tensors + JSON metadata, and back; reading
parses a JSON header and raw tensor bytes, so a crafted file cannot run code. `encode_state` turns nested dicts / lists / tuples of tensors and JSON scalars into JSON data,
moving each tensor into a dict under its path in the state (e.g. `optimizer/state/0/exp_avg`);
`decode_state` inverts it. JSON keeps what a state needs exactly: floats round-trip bit for bit,
tuples and dicts with integer keys (an optimizer's per-parameter state) are tagged so they come
back as they were. The caller stores the tensors with safetensors and the JSON in its metadata,
so reading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TAGS = ("__tensor__", "__tuple__", "__items__")  # JSON objects with one of these keys are encoded


def default_mode() -> int:
    """The permissions `open(path, "w")` gives a new file: 0666 less the process's umask."""
    try:  # Linux: read it, without the moment of umask 0 that setting it to read it costs
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("Umask:"))
        umask = int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(dest: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temp file beside `dest`, fsync it, then rename it over `dest`.

    `dest` ends with the permissions a plain `open(dest, "w")` would give it (0666 less the
    umask), not mkstemp's 0600: they are set after `write`, which may replace the temp file
    (safetensors' `save_file` writes a file of its own and renames it over the path it is given).
    On any error the temp file is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pack_state(
    state: dict[str, Any], format: str, version: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) for `safetensors.torch.save_file`: `state` (nested dicts / lists /
    tuples of tensors and JSON scalars) with its JSON, format and version in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(encode_state(state, tensors, ""))
    return tensors, {"format": format, "version": version, "state": header}


def read_state(path: str | os.PathLike[str], format: str, version: str) -> dict[str, Any]:
    """The state `pack_state` stored at `path` (tensors on the CPU); ValueError saying why for
    any other file (nothing in it is executed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != format or "state" not in metadata:
                raise ValueError(f"no {format} in it")
            if metadata.get("version") != version:
                raise ValueError(f"format version {metadata.get('version')}, not {version}")
            names = f.keys()  # a safetensors file handle is not iterable itself
            tensors = {name: f.get_tensor(name) for name in names}
        state = decode_state(json.loads(metadata["state"]), tensors)
    except Exception as err:  # safetensors, json and a malformed tree raise several types
        raise ValueError(str(err)) from None
    if not isinstance(state, dict):
        raise ValueError("its state is not a mapping")
    return state


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """`obj` as JSON data; its tensors move into `tensors` under their path `key` ("" at the
    top)."""
    if isinstance(obj, torch.Tensor):
        # A copy: safetensors refuses tensors that share memory (and needs them on the CPU).
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(t in obj for t in TAGS):
            return {k: encode_state(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint dict keys must be str or int, at {key or '/'}")
        return {"__items__": [[k, encode_state(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint, at {key or '/'}")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """What `encode_state` encoded, its tensors taken from `tensors`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: decode_state(v, tensors) for k, v in obj["__items__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}
