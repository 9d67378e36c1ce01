"""Medusa heads (Cai et al. 2024, "Medusa", Sec. 2.1.1) and their on-disk formats.

Shape legend: B = rows (positions), K = heads, E = hidden size, V = vocabulary.

Head k maps the base model's last hidden state h_t to logits for token t + k + 2 (the base LM head
itself predicts t + 1):  p_k = softmax(W2_k · (h + SiLU(W1_k h + b1_k))), with `num_layers`
residual blocks. W1 is zero-initialised, so an untrained head starts as the base LM head applied
one token too early. W2 is either the head's own matrix (initialised from the base LM head, the
published format) or the base LM head itself, shared by all heads and frozen (one matmul projects
all K heads at once).

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
import torch.nn.functional as F
from torch import nn

from medusa_engine.atomic import atomic_write
from medusa_engine.config import HeadsConfig
from medusa_engine.recurrent_heads import RecurrentHeads

FORMAT = "medusa-engine"
WEIGHTS = "heads.safetensors"


class HeadsError(ValueError):
    """Heads that cannot be loaded or do not fit the base model; one line for the CLI."""


def check_shape(config: HeadsConfig, hidden_size: int, vocab_size: int, model_name: str) -> None:
    """Raise `HeadsError` when heads of `config` cannot run on a model of this shape."""
    if config.hidden_size != hidden_size or config.vocab_size != vocab_size:
        trained = f" (trained for {config.base_model})" if config.base_model else ""
        raise HeadsError(
            f"heads{trained} expect hidden size {config.hidden_size} and vocabulary "
            f"{config.vocab_size}, but the model{' ' + model_name if model_name else ''} has "
            f"{hidden_size} and {vocab_size}"
        )


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W and b zero-initialised (the identity at init)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x_BE: torch.Tensor) -> torch.Tensor:
        return x_BE + F.silu(self.linear(x_BE))


class LinearResidual(nn.Module):
    """x + U x, U zero-initialised (the identity at init); see `HeadsConfig.out_map`."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x_BE: torch.Tensor) -> torch.Tensor:
        return x_BE + self.linear(x_BE)


class MedusaHeads(nn.Module):
    """K heads; `forward(hidden_BE, lm_head)` returns logits_BKV."""

    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        self.config = config
        e, v = config.hidden_size, config.vocab_size
        # Distinct modules per block (never `[ResBlock(e)] * n`, which would share weights).
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *(ResBlock(e) for _ in range(config.num_layers)),
                *([LinearResidual(e)] if config.out_map else []),
            )
            for _ in range(config.num_heads)
        )
        self.lm_heads = (
            None
            if config.shared_lm_head
            else nn.ModuleList(nn.Linear(e, v, bias=False) for _ in range(config.num_heads))
        )

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def init_from_base(self, lm_head_VE: torch.Tensor) -> None:
        """Copy the base LM head into each head's own projection (no-op when shared)."""
        if self.lm_heads is not None:
            with torch.no_grad():
                for head in self.lm_heads:
                    head.weight.copy_(lm_head_VE)  # type: ignore[operator]

    def hidden(self, hidden_BE: torch.Tensor) -> torch.Tensor:
        """The heads' residual stacks: hidden_BKE."""
        return torch.stack([blocks(hidden_BE) for blocks in self.blocks], dim=1)

    def forward(self, hidden_BE: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        h_BKE = self.hidden(hidden_BE)
        if self.lm_heads is None:
            if lm_head is None:
                raise ValueError("these heads share the base LM head: pass lm_head=")
            return lm_head(h_BKE)
        return torch.stack([proj(h_BKE[:, k]) for k, proj in enumerate(self.lm_heads)], dim=1)

    def check_compatible(self, hidden_size: int, vocab_size: int, model_name: str = "") -> None:
        """Raise `HeadsError` when these heads cannot run on a model of this shape."""
        check_shape(self.config, hidden_size, vocab_size, model_name)

    # ---- persistence ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `config.json` + `heads.safetensors`, each atomically (temp file + rename)."""
        save_heads(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> MedusaHeads:
        """Load Medusa heads in our format or the published FasterDecoding/Medusa format."""
        heads = load_heads(directory)
        if not isinstance(heads, MedusaHeads):
            raise HeadsError(f"{directory} holds {heads.config.kind} heads, not Medusa heads")
        return heads


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


def load_heads(directory: str | os.PathLike[str]) -> AnyHeads:
    """Heads of any kind in our format, or Medusa heads in the published format."""
    path = Path(directory)
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
