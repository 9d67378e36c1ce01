"""`medusa-engine export-heads` (medusa_engine/export.py) and loading the EAGLE-3 layout.

Names and shapes were checked against the loaders' source (read, not copied):

* SGLang `python/sglang/srt/models/llama_eagle3.py` (`LlamaForCausalLMEagle3`): `fc` [H, 3H_target]
  (`target_hidden_size`), `midlayer` = a Llama decoder layer whose qkv reads 2H
  (`cat([input_layernorm(embeds), hidden_norm(hidden)])`), then `post_attention_layernorm`, MLP;
  `norm`, `lm_head` [draft_vocab_size, H]; `d2t` = target id - draft id ("hot token ids");
  aux ids from `eagle_config.eagle_aux_hidden_state_layer_ids` (+1 when captured: id k = the
  output of layer k).
* vLLM `vllm/model_executor/models/llama_eagle3.py` (`Eagle3LlamaForCausalLM`): the same names
  (`midlayer.` -> `layers.0.`, q/k/v stacked into qkv_proj with input 2H, `d2t` ->
  `draft_id_to_target_id`, `embed_tokens` optional: the target's otherwise), aux ids from the
  top-level `eagle_aux_hidden_state_layer_ids` (`get_eagle3_aux_layers_from_config`; the layer
  whose input is captured).
* vLLM `vllm/model_executor/models/medusa.py` (`Medusa`) and
  `vllm/transformers_utils/configs/medusa.py` (`MedusaConfig`): `blocks.{k}.layers.{j}.{weight,
  bias}` (x + SiLU(W x + b), bias iff `medusa_fc_bias`), `lm_heads.{k}.weight`, or one
  `lm_heads.0.weight` read as `lm_head` when `original_lm_head`.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from medusa_engine import cli
from medusa_engine.config import HeadsConfig, HeadsError
from medusa_engine.eagle3 import Eagle3Drafter, Eagle3Heads
from medusa_engine.export import export_heads, vllm_medusa_state
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import load_heads, save_heads
from medusa_engine.tree import tree_from_name
from tests.test_eagle3 import random_eagle3


class Rows:
    """An `AuxSource` over fixed feature rows (no base model in the way)."""

    def __init__(self, aux_TX: torch.Tensor) -> None:
        self.aux_TX = aux_TX

    def rows(self) -> torch.Tensor:
        return self.aux_TX

    def inputs(self):
        raise RuntimeError("not needed")


@pytest.fixture(scope="module")
def heads(stories260k):
    return random_eagle3(stories260k, seed=3)


@pytest.fixture()
def exported(heads, tmp_path):
    save_heads(heads, tmp_path / "ours")
    export_heads(tmp_path / "ours", "eagle3", tmp_path / "eagle3")
    return tmp_path / "eagle3"


def test_eagle3_export_has_the_loaders_names_shapes_and_config(heads, exported):
    state = load_file(str(exported / "model.safetensors"))
    h, m = 64, 256
    q, kv, f = 8 * 8, 4 * 8, 172
    want = {
        "fc.weight": (h, 3 * h),
        "midlayer.self_attn.q_proj.weight": (q, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q),
        "midlayer.mlp.gate_proj.weight": (f, h),
        "midlayer.mlp.up_proj.weight": (f, h),
        "midlayer.mlp.down_proj.weight": (h, f),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (m, h),
        "d2t": (m,),
    }
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    assert state["d2t"].dtype == torch.int64
    assert torch.equal(state["d2t"] + torch.arange(m), heads.draft_vocab_M)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 1
    assert (config["vocab_size"], config["draft_vocab_size"]) == (512, m)
    assert config["tie_word_embeddings"] is False and config["target_hidden_size"] == h
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # vLLM counts inputs


def test_export_then_import_gives_identical_drafts(stories260k, prompt_ids, heads, exported):
    back = load_heads(exported)
    assert isinstance(back, Eagle3Heads) and back.config == heads.config
    tree = tree_from_name("mc_sim_7b_63", 3)
    aux_TX = torch.randn(len(prompt_ids[0]), 3 * 64, generator=torch.Generator().manual_seed(0))
    drafts = []
    for h in (heads, back):
        drafter = Eagle3Drafter(h, stories260k, capture=Rows(aux_TX))
        with torch.inference_mode():
            drafter.on_commit(prompt_ids[0], 0, None)
        drafts.append(drafter.draft(torch.zeros(64), torch.tensor(7), tree, prompt_ids[0]))
    assert torch.equal(drafts[0], drafts[1])


def test_the_exported_midlayer_in_transformers_llama_layer_matches_ours(heads, exported):
    """transformers' own LlamaDecoderLayer with q/k/v widened to 2H as the loaders widen them
    (SGLang/vLLM: QKVParallelLinear(2 * hidden_size, ...)) runs the exported weights; the same
    inputs through our drafter give the same states and logits."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
    )

    state = load_file(str(exported / "model.safetensors"))
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        rms_norm_eps=1e-5,
        vocab_size=512,
        max_position_embeddings=512,
    )
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(layer.self_attn, name)
        setattr(layer.self_attn, name, torch.nn.Linear(128, old.out_features, bias=False))
    prefix = "midlayer."
    layer.load_state_dict(
        {
            k[len(prefix) :]: v
            for k, v in state.items()
            if k.startswith(prefix) and "hidden_norm" not in k
        }
    )  # strict: every name of the layer is in the export
    hidden_norm, norm = LlamaRMSNorm(64, 1e-5), LlamaRMSNorm(64, 1e-5)
    hidden_norm.weight.data = state["midlayer.hidden_norm.weight"]
    norm.weight.data = state["norm.weight"]

    t = 9
    g = torch.Generator().manual_seed(1)
    aux_TX, emb_TE = torch.randn(t, 192, generator=g), torch.randn(t, 64, generator=g)
    with torch.no_grad():
        h_TE = aux_TX @ state["fc.weight"].T
        x = torch.cat([layer.input_layernorm(emb_TE), hidden_norm(h_TE)], dim=-1)[None]
        cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(t)[None])
        causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
        attn, _ = layer.self_attn(x, (cos, sin), causal)
        r = h_TE + attn[0]
        s_ref = r + layer.mlp(layer.post_attention_layernorm(r))
        logits_ref = norm(s_ref) @ state["lm_head.weight"].T

    class Embed(torch.nn.Module):  # our drafter reads embeddings of token ids: give emb_TE
        def forward(self, ids):
            return emb_TE[ids - 1]

    class Model:
        hidden_size, vocab_size, name, attention = 64, 512, "", "sdpa"
        device, dtype, embed_tokens = torch.device("cpu"), torch.float32, Embed()

    drafter = Eagle3Drafter(load_heads(exported), Model(), capture=Rows(aux_TX), int8=False)
    ids = list(range(t + 1))  # row p reads token p + 1: emb_TE[p]
    with torch.inference_mode():
        drafter.on_commit(ids[:t], 0, None)
        drafter._sync(ids[:t], ids[t])
        ours = drafter.memory.s_SE[:t]
        torch.testing.assert_close(ours, s_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(drafter.heads.logits(ours), logits_ref, atol=1e-5, rtol=1e-5)


def _write_layout(folder, config: dict, state: dict, bin_file: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))


def test_a_published_layout_loads_with_its_extras_and_vllm_layer_ids(heads, exported, tmp_path):
    """A published checkpoint: pytorch_model.bin, `t2d` and its own copy of the embedding
    (both unused: the base's embedding is), aux ids only in vLLM's top-level form."""
    config = json.loads((exported / "config.json").read_text())
    del config["eagle_config"], config["medusa_engine"]
    state = load_file(str(exported / "model.safetensors"))
    state["t2d"] = torch.zeros(512, dtype=torch.bool)
    state["embed_tokens.weight"] = torch.zeros(512, 64)
    _write_layout(tmp_path / "published", config, state, bin_file=True)
    back = load_heads(tmp_path / "published")
    assert isinstance(back, Eagle3Heads) and back.config.aux_layers == (0, 2, 3)
    assert torch.equal(back.lm_head.weight, heads.lm_head.weight)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, s: c.update(num_hidden_layers=2), "only one is supported"),
        (lambda c, s: c.update(tie_word_embeddings=True), "tie_word_embeddings"),
        (lambda c, s: c.update(hidden_size="64"), "hidden_size must be an integer"),
        (lambda c, s: c.update(draft_vocab_size=128), "has shape \\(256,?.*config says \\(128"),
        (lambda c, s: s.pop("fc.weight"), "missing \\['fc.weight'\\]"),
        (lambda c, s: s.update(d2t=s["d2t"].float()), "d2t must hold integers"),
        (lambda c, s: c.update(rope_scaling={"rope_type": "yarn"}), "not 'yarn'"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(exported, tmp_path, change, message):
    config = json.loads((exported / "config.json").read_text())
    state = load_file(str(exported / "model.safetensors"))
    change(config, state)
    _write_layout(tmp_path / "bad", config, state)
    with pytest.raises(HeadsError, match=message) as err:
        load_heads(tmp_path / "bad")
    assert "\n" not in str(err.value)


def test_a_layout_folder_without_weights_is_a_one_line_error(exported, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((exported / "config.json").read_text())
    with pytest.raises(HeadsError, match="has no model.safetensors or pytorch_model.bin"):
        load_heads(tmp_path / "empty")


def medusa_heads(shared: bool, out_map: bool = False) -> MedusaHeads:
    config = HeadsConfig(3, 2, 64, 512, shared_lm_head=shared, out_map=out_map)
    heads = MedusaHeads(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return heads


def vllm_medusa_logits(state: dict, config: dict, h_BE: torch.Tensor) -> list[torch.Tensor]:
    """vLLM's Medusa forward, written from its definition: per head, x + SiLU(W x + b) for each
    layer, then that head's lm_head (the one `lm_head` when `original_lm_head`)."""
    out = []
    for k in range(config["num_heads"]):
        x = h_BE
        for j in range(config["num_hidden_layers"]):
            w, b = state[f"blocks.{k}.layers.{j}.weight"], state[f"blocks.{k}.layers.{j}.bias"]
            x = x + F.silu(x @ w.T + b)
        proj = state["lm_heads.0.weight" if config["original_lm_head"] else f"lm_heads.{k}.weight"]
        out.append(x @ proj.T)
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_vllm_medusa_export_has_vllms_names_and_computes_our_logits(shared, tmp_path):
    heads = medusa_heads(shared)
    base_lm = torch.randn(512, 64)
    save_heads(heads, tmp_path / "ours")
    config, state = vllm_medusa_state(load_heads(tmp_path / "ours"), base_lm if shared else None)
    blocks = {
        f"blocks.{k}.layers.{j}.{p}" for k in range(3) for j in range(2) for p in ("weight", "bias")
    }
    lm = {"lm_heads.0.weight"} if shared else {f"lm_heads.{k}.weight" for k in range(3)}
    assert set(state) == blocks | lm
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert config["medusa_fc_bias"] is True and config["original_lm_head"] is shared
    assert (config["num_heads"], config["num_hidden_layers"]) == (3, 2)
    h_BE = torch.randn(4, 64)
    with torch.no_grad():
        ours = heads(h_BE, torch.nn.Linear(64, 512, bias=False).requires_grad_(False))
        if shared:
            ours = torch.stack([heads.hidden(h_BE)[:, k] @ base_lm.T for k in range(3)], dim=1)
    for k, want in enumerate(vllm_medusa_logits(state, config, h_BE)):
        torch.testing.assert_close(ours[:, k], want)


def test_vllm_medusa_refuses_what_it_cannot_express(tmp_path):
    with pytest.raises(HeadsError, match="out_map"):
        vllm_medusa_state(medusa_heads(False, out_map=True))
    with pytest.raises(HeadsError, match="pass --model"):
        vllm_medusa_state(medusa_heads(True))


def test_the_command_exports_and_reports_errors_in_one_line(heads, tmp_path, capsys):
    save_heads(heads, tmp_path / "ours")
    out = tmp_path / "served"
    argv = [
        "export-heads",
        "--heads",
        str(tmp_path / "ours"),
        "--format",
        "eagle3",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert isinstance(load_heads(out), Eagle3Heads)
    assert cli.main(argv) == 2  # the folder holds an export already
    assert "pass --overwrite" in capsys.readouterr().err
    medusa = tmp_path / "medusa"
    save_heads(medusa_heads(False), medusa)
    assert (
        cli.main([*argv[:2], str(medusa), "--format", "eagle3", "--out", str(tmp_path / "x")]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "medusa heads, not eagle3 heads" in err
