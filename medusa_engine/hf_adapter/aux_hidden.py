"""Auxiliary hidden states of a transformers decoder, captured during its own forwards.

Shape legend (ARCHITECTURE.md): T new tokens of a forward, E hidden size, X = 3E.

An EAGLE-3 drafter (`medusa_engine/eagle3.py`) reads the outputs of three decoder layers at
every verified position. They are taken from the verification forward itself, with PyTorch
forward hooks on those layers (an extension point of `nn.Module`, no change to the model): no
second base pass. What it costs: each hook keeps a reference to a tensor the layer produced
anyway (3 x T x E values per forward stay alive until the next forward), plus one Python call
per hooked layer; the concatenation to aux_TX happens only when the drafter asks (`rows`).

A forward pre-hook on the decoder keeps the forward's input and position ids (device tensors,
no host sync) so that a drafter can adopt a teacher-forced forward's rows (`AuxSource.inputs`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from medusa_engine.config import HeadsError


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The decoder layers of an `HFModel` (HeadsError if its decoder has no `.layers`)."""
    layers = getattr(model.decoder, "layers", None)
    if layers is None:
        raise HeadsError(f"{model.name}: its decoder exposes no .layers to capture")
    return layers


class AuxCapture:
    """Forward hooks keeping decoder layers `layer_ids`' outputs (the residual stream after each
    of them) of the latest forward of `model` (an `HFModel`); `close()` removes them."""

    def __init__(self, model: Any, layer_ids: Sequence[int]) -> None:
        layers = decoder_layers(model)
        ids = tuple(layer_ids)
        if len(ids) != 3 or any(not 0 <= k < len(layers) for k in ids):
            raise HeadsError(
                f"eagle3 aux layers {list(ids)} do not fit {model.name or 'the model'}'s "
                f"{len(layers)} decoder layers"
            )
        self.layer_ids = ids
        self._out: list[torch.Tensor | None] = [None] * len(ids)
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        # The hooks hold the capture weakly, and go when it goes (its drafter dropped).
        me = weakref.ref(self)
        handles = [layers[k].register_forward_hook(_keeper(me, i)) for i, k in enumerate(ids)]
        handles.append(model.decoder.register_forward_pre_hook(_input_keeper(me), with_kwargs=True))
        self._finalizer = weakref.finalize(self, _remove, handles)

    def rows(self) -> torch.Tensor:
        """aux_TX of the latest forward (the three layers' outputs side by side)."""
        if any(out is None for out in self._out):
            raise RuntimeError("no forward captured yet")
        return torch.cat([out for out in self._out if out is not None], dim=-1)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inputs is None:
            raise RuntimeError("no forward captured yet")
        return self._inputs

    def close(self) -> None:
        """Remove the hooks now (they also go when the capture is garbage-collected)."""
        self._finalizer()


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _keeper(ref: weakref.ref[AuxCapture], slot: int):
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        capture = ref()
        if capture is not None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            capture._out[slot] = hidden.detach()[0]  # [T, E] of the one row

    return hook


def _input_keeper(ref: weakref.ref[AuxCapture]):
    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        capture = ref()
        if capture is not None:
            ids, pos = kwargs.get("input_ids"), kwargs.get("position_ids")
            capture._out = [None] * len(capture.layer_ids)
            capture._inputs = (ids[0], pos[0]) if ids is not None and pos is not None else None

    return hook
