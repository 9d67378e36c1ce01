"""Draft heads on disk: save and load heads of every kind (`HeadsConfig.kind`).

Formats:
* ours: `config.json` (`"format": "medusa-engine"` + `HeadsConfig` fields) and `heads.safetensors`;
* FasterDecoding/Medusa: `config.json` with `medusa_num_heads`, `medusa_num_layers`,
  `base_model_name_or_path`, weights in `medusa_lm_head.safetensors` (or `.pt`), keys
  `{k}.{j}.linear.{weight,bias}` for the blocks and `{k}.{num_layers}.weight` for W2;
* the EAGLE-3 layout (SGLang / vLLM `LlamaForCausalLMEagle3`, ours exported or a published
  one): `config.json` (`eagle3.config_from_json`), weights in `model.safetensors` (or
  `pytorch_model.bin`) under the names `eagle3.Eagle3Heads` uses; ours in our format are
  `kind: "eagle3"` with the same names in `heads.safetensors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from attention.state_files import atomic_write
from medusa_engine.config import HeadsConfig, HeadsError
from medusa_engine.eagle3 import Eagle3Config, Eagle3Heads, config_from_json
from medusa_engine.heads import MedusaHeads
from medusa_engine.recurrent_heads import RecurrentHeads

FORMAT = "medusa-engine"
WEIGHTS = "heads.safetensors"

AnyHeads = MedusaHeads | RecurrentHeads | Eagle3Heads
EAGLE3_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the published layout's files
EAGLE3_UNUSED = ("t2d", "embed_tokens.weight")  # published extras: the base's embedding is used


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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HeadsError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise HeadsError(f"{config_file} must hold a JSON object")
    if raw.get("format") == FORMAT and raw.get("kind") == "eagle3":
        return _load_eagle3(path, raw, path / WEIGHTS)
    if raw.get("format") == FORMAT:
        return _load_ours(path, raw)
    if "LlamaForCausalLMEagle3" in (raw.get("architectures") or []):
        file = next((path / f for f in EAGLE3_WEIGHTS if (path / f).is_file()), None)
        if file is None:
            raise HeadsError(f"{path} has no {' or '.join(EAGLE3_WEIGHTS)}")
        return _load_eagle3(path, raw, file)
    if "medusa_num_heads" in raw:
        return _load_published(path, raw)
    raise HeadsError(f"{config_file} describes neither medusa-engine, Medusa nor EAGLE-3 heads")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; HeadsError (one line) if it cannot be read."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / pickle errors have no common type
        raise HeadsError(f"cannot read {file}: {type(err).__name__}: {err}") from err


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file's header declares (nothing loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types
        raise HeadsError(f"cannot read {file}: {type(err).__name__}: {err}") from err


def _heads_of(config: HeadsConfig) -> AnyHeads:
    return RecurrentHeads(config) if config.kind == "recurrent" else MedusaHeads(config)


def _load_ours(path: Path, raw: dict) -> AnyHeads:
    """Config and weights are checked against each other before anything is allocated: the
    config (from an untrusted folder) sizes the modules, so they are first built on the meta
    device and compared with the shapes the weights file declares."""
    fields = {k: raw[k] for k in HeadsConfig.__dataclass_fields__ if k in raw}
    file = path / WEIGHTS
    if not file.is_file():
        raise HeadsError(f"{path} has no {WEIGHTS}")
    found = _file_shapes(file)
    try:
        config = HeadsConfig(**fields)
        # Every head and layer has tensors of its own: more of them than tensors is a bad config
        # (and would build that many modules even on the meta device).
        if config.num_heads > len(found) or config.num_layers > len(found):
            raise ValueError(
                f"weights do not match the config: {config.num_heads} heads of "
                f"{config.num_layers} layers, but {WEIGHTS} holds {len(found)} tensors"
            )
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in _heads_of(config).state_dict().items()}
    except (TypeError, ValueError, OverflowError, RuntimeError) as err:  # sizes torch refuses
        raise HeadsError(f"{path / 'config.json'}: {str(err).splitlines()[0]}") from None
    _check_shapes(expected, found, file)
    heads = _heads_of(config)
    _load_state(heads, _read_weights(file), file)
    return heads


def _load_eagle3(path: Path, raw: dict, file: Path) -> Eagle3Heads:
    """EAGLE-3 heads: ours (`kind: "eagle3"`) or the published layout; config and weights are
    checked against each other on the meta device first, as in `_load_ours`."""
    try:
        if raw.get("format") == FORMAT:
            config = Eagle3Config(
                **{k: raw[k] for k in Eagle3Config.__dataclass_fields__ if k in raw}
            )
        else:
            config = config_from_json(raw)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in Eagle3Heads(config).state_dict().items()}
    except (TypeError, ValueError, KeyError, OverflowError, RuntimeError) as err:
        raise HeadsError(f"{path / 'config.json'}: {str(err).splitlines()[0]}") from None
    if not file.is_file():
        raise HeadsError(f"{path} has no {file.name}")
    if file.suffix == ".safetensors":
        found = _file_shapes(file)
    else:
        found = {k: tuple(v.shape) for k, v in _read_weights(file).items()}
    found = {k: v for k, v in found.items() if k not in EAGLE3_UNUSED}
    if "d2t" not in found and config.draft_vocab_size == config.vocab_size:
        found["d2t"] = (config.draft_vocab_size,)  # a full draft vocabulary needs no map
    _check_shapes(expected, found, file)
    state = {k: v for k, v in _read_weights(file).items() if k not in EAGLE3_UNUSED}
    state.setdefault("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
    if state["d2t"].is_floating_point() or state["d2t"].is_complex():
        raise HeadsError(f"{file}: d2t must hold integers, not {state['d2t'].dtype}")
    state["d2t"] = state["d2t"].to(torch.int64)
    heads = Eagle3Heads(config)
    _load_state(heads, state, file)
    return heads


def _load_published(path: Path, raw: dict) -> MedusaHeads:
    files = [path / "medusa_lm_head.safetensors", path / "medusa_lm_head.pt"]
    file = next((f for f in files if f.is_file()), None)
    if file is None:
        raise HeadsError(f"{path} has no medusa_lm_head.safetensors or medusa_lm_head.pt")
    state = _read_weights(file)
    try:
        k = int(raw["medusa_num_heads"])
        # Absent from some published configs: the blocks of head 0 come before its projection.
        n = int(raw.get("medusa_num_layers", max(int(key.split(".")[1]) for key in state)))
    except (TypeError, ValueError, IndexError) as err:
        raise HeadsError(f"{path / 'config.json'}: not Medusa heads ({err})") from None
    if k < 1 or n < 0:
        raise HeadsError(f"{path / 'config.json'}: {k} heads of {n} layers")
    proj = state.get(f"0.{n}.weight")
    if proj is None:
        raise HeadsError(f"{file} lacks '0.{n}.weight': not {k} heads of {n} layers")
    if proj.ndim != 2:
        raise HeadsError(f"{file}: '0.{n}.weight' is not a matrix")
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
        if not layer.isdigit():
            raise HeadsError(f"{file}: unexpected weight {key!r}")
        if int(layer) == n:
            renamed[f"lm_heads.{head}.{'.'.join(rest)}"] = value
        else:
            renamed[f"blocks.{head}.{layer}.{'.'.join(rest)}"] = value
    _load_state(heads, renamed, file)
    return heads


def _check_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], file: Path
) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise HeadsError(
            f"{file}: weights do not match the config (missing {missing[:3]}, extra {extra[:3]})"
        )
    for key, shape in found.items():
        if shape != expected[key]:
            raise HeadsError(f"{file}: {key} has shape {shape}, config says {expected[key]}")


def _load_state(heads: AnyHeads, state: dict[str, torch.Tensor], file: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    _check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, file)
    heads.load_state_dict(state)
