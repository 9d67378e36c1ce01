"""Draft heads on disk: save and load heads of every kind (`HeadsConfig.kind`).

Formats:
* ours: `config.json` (`"format": "medusa-engine"` + `HeadsConfig` fields) and `heads.safetensors`;
* FasterDecoding/Medusa: `config.json` with `medusa_num_heads`, `medusa_num_layers`,
  `base_model_name_or_path`, weights in `medusa_lm_head.safetensors` (or `.pt`), keys
  `{k}.{j}.linear.{weight,bias}` for the blocks and `{k}.{num_layers}.weight` for W2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from medusa_engine.atomic import atomic_write
from medusa_engine.config import HeadsConfig, HeadsError
from medusa_engine.heads import MedusaHeads
from medusa_engine.recurrent_heads import RecurrentHeads

FORMAT = "medusa-engine"
WEIGHTS = "heads.safetensors"

AnyHeads = MedusaHeads | RecurrentHeads


def save_heads(
    heads: AnyHeads, directory: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> None:
    """Write `config.json` + `heads.safetensors`, each atomically (temp file + rename).

    `dtype` casts floating-point weights (e.g. bf16 halves the size of bundled heads)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        .detach()
        .contiguous()
        .cpu()
        for k, v in heads.state_dict().items()
    }
    atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    cfg = {"format": FORMAT, **heads.config.__dict__}
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))


def load_heads(directory: str | os.PathLike[str], kind: str | None = None) -> AnyHeads:
    """Heads of any kind in our format, or Medusa heads in the published format; `kind`
    ("medusa", "recurrent") refuses heads of another kind."""
    heads = _load_any(Path(directory))
    if kind is not None and heads.config.kind != kind:
        raise HeadsError(f"{directory} holds {heads.config.kind} heads, not {kind} heads")
    return heads


def _load_any(path: Path) -> AnyHeads:
    if not path.is_dir():
        raise HeadsError(f"heads folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HeadsError(f"{path} has no config.json: not a heads folder")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise HeadsError(f"{config_file} is not valid JSON: {err}") from None
    if raw.get("format") == FORMAT:
        return _load_ours(path, raw)
    if "medusa_num_heads" in raw:
        return _load_published(path, raw)
    raise HeadsError(f"{config_file} describes neither medusa-engine nor Medusa heads")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; HeadsError (one line) if it cannot be read."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / pickle errors have no common type
        raise HeadsError(f"cannot read {file}: {type(err).__name__}: {err}") from err


def _load_ours(path: Path, raw: dict) -> AnyHeads:
    fields = {k: raw[k] for k in HeadsConfig.__dataclass_fields__ if k in raw}
    try:
        config = HeadsConfig(**fields)
        heads = RecurrentHeads(config) if config.kind == "recurrent" else MedusaHeads(config)
    except (TypeError, ValueError) as err:
        raise HeadsError(f"{path / 'config.json'}: {err}") from None
    file = path / WEIGHTS
    if not file.is_file():
        raise HeadsError(f"{path} has no {WEIGHTS}")
    _load_state(heads, _read_weights(file), file)
    return heads


def _load_published(path: Path, raw: dict) -> MedusaHeads:
    files = [path / "medusa_lm_head.safetensors", path / "medusa_lm_head.pt"]
    file = next((f for f in files if f.is_file()), None)
    if file is None:
        raise HeadsError(f"{path} has no medusa_lm_head.safetensors or medusa_lm_head.pt")
    state = _read_weights(file)
    k, n = int(raw["medusa_num_heads"]), int(raw["medusa_num_layers"])
    proj = state.get(f"0.{n}.weight")
    if proj is None:
        raise HeadsError(f"{file} lacks '0.{n}.weight': not {k} heads of {n} layers")
    vocab, hidden = proj.shape
    config = HeadsConfig(
        num_heads=k,
        num_layers=n,
        hidden_size=hidden,
        vocab_size=vocab,
        shared_lm_head=False,
        base_model=str(raw.get("base_model_name_or_path", "")),
    )
    heads = MedusaHeads(config)
    renamed = {}
    for key, value in state.items():
        head, layer, *rest = key.split(".")
        if int(layer) == n:
            renamed[f"lm_heads.{head}.{'.'.join(rest)}"] = value
        else:
            renamed[f"blocks.{head}.{layer}.{'.'.join(rest)}"] = value
    _load_state(heads, renamed, file)
    return heads


def _load_state(heads: AnyHeads, state: dict[str, torch.Tensor], file: Path) -> None:
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise HeadsError(
            f"{file}: weights do not match the config (missing {missing[:3]}, extra {extra[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise HeadsError(
                f"{file}: {key} has shape {tuple(value.shape)}, config says {tuple(expected[key].shape)}"
            )
    heads.load_state_dict(state)
