"""A training state as JSON + named tensors: what a checkpoint stores without pickle.

Shared by every training loop of the project (heads and DiT), beside the precision runtime.
`encode_state` turns nested dicts / lists / tuples of tensors and JSON scalars into JSON data,
moving each tensor into a dict under its path in the state (e.g. `optimizer/state/0/exp_avg`);
`decode_state` inverts it. JSON keeps what a state needs exactly: floats round-trip bit for bit,
tuples and dicts with integer keys (an optimizer's per-parameter state) are tagged so they come
back as they were. The caller stores the tensors with safetensors and the JSON in its metadata,
so reading a checkpoint never runs code.
"""

from __future__ import annotations

from typing import Any

import torch

TAGS = ("__tensor__", "__tuple__", "__items__")  # JSON objects with one of these keys are encoded


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
