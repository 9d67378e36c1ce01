"""`medusa-engine export-heads`: our heads in the layouts that serving engines load.

* `eagle3` (EAGLE-3 heads, `eagle3.py`): `config.json` of `LlamaForCausalLMEagle3`
  (`eagle3.eagle3_config_json`) and `model.safetensors` holding the heads' own tensors under
  their own names (`fc.weight`, `midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t`): the names
  SGLang's `python/sglang/srt/models/llama_eagle3.py` and vLLM's
  `vllm/model_executor/models/llama_eagle3.py` load. The embedding is not written: both take
  the target model's when the drafter has none.
* `vllm-medusa` (Medusa heads, `heads.py`): vLLM's `MedusaModel`
  (`vllm/model_executor/models/medusa.py`, config `vllm/transformers_utils/configs/medusa.py`):
  `blocks.{k}.layers.{j}.{weight,bias}`, `lm_heads.{k}.weight`; heads that share the base LM
  head are written with `original_lm_head: true` and that head (read from `--model`) as
  `lm_heads.0.weight`. Heads with `out_map` have no vLLM counterpart and are refused.

`--heads DIR` is any folder `heads_io.load_heads` reads, an EAGLE-3 layout folder included, so
an exported drafter imports back unchanged (tests/test_export_heads.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from attention.state_files import atomic_write
from medusa_engine.config import HeadsError
from medusa_engine.eagle3 import Eagle3Heads, eagle3_config_json
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import load_heads

FORMATS = ("eagle3", "vllm-medusa")


def _write(out: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p), {"format": "pt"}))
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(out / "config.json", lambda p: p.write_text(text))


def export_eagle3(heads: Eagle3Heads, out: Path) -> None:
    """The EAGLE-3 layout: a rename-free dump of the heads' state dict."""
    config = eagle3_config_json(heads.config)
    config["torch_dtype"] = str(heads.fc.weight.dtype).removeprefix("torch.")
    _write(out, config, heads.state_dict())


def vllm_medusa_state(
    heads: MedusaHeads, lm_head_VE: torch.Tensor | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of vLLM's MedusaModel for these heads; `lm_head_VE`: the base LM head,
    needed when the heads share it."""
    c = heads.config
    if c.out_map:
        raise HeadsError("heads with out_map (x + U x) have no vLLM Medusa counterpart")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in heads.state_dict().items():  # blocks.{k}.{j}.linear.* / lm_heads.{k}.*
        parts = name.split(".")
        if parts[0] == "blocks":
            state[f"blocks.{parts[1]}.layers.{parts[2]}.{parts[4]}"] = tensor
        else:
            state[name] = tensor
    if heads.lm_heads is None and lm_head_VE is None:
        raise HeadsError("these heads share the base model's LM head: pass --model to read it")
    if heads.lm_heads is None and lm_head_VE is not None:
        if tuple(lm_head_VE.shape) != (c.vocab_size, c.hidden_size):
            raise HeadsError(
                f"the model's LM head is {tuple(lm_head_VE.shape)}, the heads expect "
                f"{(c.vocab_size, c.hidden_size)}"
            )
        state["lm_heads.0.weight"] = lm_head_VE
    config = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "num_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "medusa_fc_bias": True,
        "original_lm_head": heads.lm_heads is None,
        "truncated_vocab_size": c.vocab_size,
    }
    if c.base_model:
        config["base_model_name_or_path"] = c.base_model
    return config, state


def export_heads(heads_dir: Path, fmt: str, out: Path, model: str | None = None) -> str:
    """Export the heads in `heads_dir` as `fmt` into `out`; returns a one-line summary."""
    if fmt not in FORMATS:
        raise HeadsError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    heads = load_heads(heads_dir)
    if fmt == "eagle3":
        if not isinstance(heads, Eagle3Heads):
            raise HeadsError(f"{heads_dir} holds {heads.config.kind} heads, not eagle3 heads")
        export_eagle3(heads, out)
        return f"wrote the EAGLE-3 drafter ({heads.config.draft_vocab_size} draft tokens) to {out}"
    if not isinstance(heads, MedusaHeads):
        raise HeadsError(f"{heads_dir} holds {heads.config.kind} heads; vllm-medusa needs medusa")
    lm_head = None
    if heads.lm_heads is None and model is not None:
        from medusa_engine.hf_adapter import HFModel, quiet_transformers

        quiet_transformers()
        lm_head = HFModel.load(model, dtype="fp32").lm_head.weight.detach()
    config, state = vllm_medusa_state(heads, lm_head)
    _write(out, config, state)
    return f"wrote {heads.num_heads} Medusa heads for vLLM to {out}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", required=True, help="heads folder (any format load_heads reads)")
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.add_argument(
        "--model",
        default=None,
        help="vllm-medusa: the base model (alias, folder, hub id) whose LM head shared heads use",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HeadsError(f"--out {out} is a file; give a folder")
    if (out / "config.json").exists() and not args.overwrite:
        raise HeadsError(f"{out} already holds an export (config.json): pass --overwrite")
    print(export_heads(Path(args.heads), args.format, out, args.model))
    return 0
