"""Medusa heads: identity at init, both on-disk formats, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from medusa_engine.config import HeadsConfig, HeadsError
from medusa_engine.drafters import HeadsDrafter
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import load_heads, save_heads
from medusa_engine.int8_linear import Int8Linear, int8_supported

E, V = 16, 40


def test_blocks_are_the_identity_at_init_and_distinct():
    heads = MedusaHeads(HeadsConfig(num_heads=3, num_layers=2, hidden_size=E, vocab_size=V))
    x = torch.randn(5, E)
    torch.testing.assert_close(heads.hidden(x), x[:, None].expand(5, 3, E))
    weights = [b.linear.weight for blocks in heads.blocks for b in blocks]
    assert len({w.data_ptr() for w in weights}) == 6  # no block shares another's weights


def test_own_lm_heads_start_from_the_base_head():
    heads = MedusaHeads(HeadsConfig(2, 1, E, V, shared_lm_head=False))
    base = torch.nn.Linear(E, V, bias=False)
    heads.init_from_base(base.weight)
    x = torch.randn(3, E)
    torch.testing.assert_close(heads(x), base(x)[:, None].expand(3, 2, V))


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_roundtrip(tmp_path, shared):
    heads = MedusaHeads(HeadsConfig(2, 2, E, V, shared_lm_head=shared, base_model="toy"))
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    save_heads(heads, tmp_path / "h")
    loaded = load_heads(tmp_path / "h", "medusa")
    assert loaded.config == heads.config
    for (k, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == [
        "config.json",
        "heads.safetensors",
    ]


def write_published(path, num_heads=2, num_layers=1, fmt="safetensors"):
    """A folder in the FasterDecoding/Medusa layout, weights keyed `{k}.{j}.linear.*`."""
    path.mkdir()
    config = {
        "medusa_num_heads": num_heads,
        "medusa_num_layers": num_layers,
        "base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
    }
    (path / "config.json").write_text(json.dumps(config))
    state = {}
    for k in range(num_heads):
        for j in range(num_layers):
            state[f"{k}.{j}.linear.weight"] = torch.randn(E, E)
            state[f"{k}.{j}.linear.bias"] = torch.randn(E)
        state[f"{k}.{num_layers}.weight"] = torch.randn(V, E)
    if fmt == "safetensors":
        save_file(state, str(path / "medusa_lm_head.safetensors"))
    else:
        torch.save(state, path / "medusa_lm_head.pt")
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_loads_the_published_medusa_format(tmp_path, fmt):
    state = write_published(tmp_path / "m", fmt=fmt)
    heads = load_heads(tmp_path / "m", "medusa")
    assert heads.config.num_heads == 2 and not heads.config.shared_lm_head
    assert heads.config.base_model == "lmsys/vicuna-7b-v1.3"
    x = torch.randn(4, E)
    for k in range(2):
        lin_w, lin_b = state[f"{k}.0.linear.weight"], state[f"{k}.0.linear.bias"]
        h = x + torch.nn.functional.silu(x @ lin_w.T + lin_b)
        torch.testing.assert_close(heads(x)[:, k], h @ state[f"{k}.1.weight"].T)


def test_mismatched_model_is_a_clear_error():
    heads = MedusaHeads(HeadsConfig(2, 1, E, V, base_model="toy"))
    with pytest.raises(HeadsError, match="expect hidden size 16 and vocabulary 40.*has 64 and 512"):
        heads.check_compatible(64, 512, "stories260k")


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(HeadsError, match="not found"):
        load_heads(tmp_path / "missing", "medusa")
    with pytest.raises(HeadsError, match="no config.json"):
        load_heads(tmp_path, "medusa")
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(HeadsError, match="not valid JSON"):
        load_heads(tmp_path, "medusa")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "format": "medusa-engine",
                "num_heads": 2,
                "num_layers": 1,
                "hidden_size": E,
                "vocab_size": V,
            }
        )
    )
    with pytest.raises(HeadsError, match="no heads.safetensors"):
        load_heads(tmp_path, "medusa")
    (tmp_path / "heads.safetensors").write_bytes(b"not a safetensors file")  # a cut download
    with pytest.raises(HeadsError, match="cannot read .*heads.safetensors"):
        load_heads(tmp_path, "medusa")
    save_file({"blocks.0.0.linear.weight": torch.zeros(E, E)}, str(tmp_path / "heads.safetensors"))
    with pytest.raises(HeadsError, match="do not match"):
        load_heads(tmp_path, "medusa")


def test_out_map_starts_as_the_identity_and_can_cancel_the_hidden_state(tmp_path):
    heads = MedusaHeads(HeadsConfig(2, 1, E, V, out_map=True))
    x = torch.randn(3, E)
    torch.testing.assert_close(heads.hidden(x), x[:, None].expand(3, 2, E))  # identity at init
    with torch.no_grad():
        heads.blocks[0][-1].linear.weight.copy_(-torch.eye(E))  # x + U x with U = -I is 0
    assert heads.hidden(x)[:, 0].abs().max() < 1e-6
    save_heads(heads, tmp_path / "h")
    loaded = load_heads(tmp_path / "h", "medusa")
    assert loaded.config.out_map
    torch.testing.assert_close(loaded.hidden(x), heads.hidden(x))


@pytest.mark.skipif(
    not int8_supported(torch.device("cpu")), reason="no quantized int8 engine on this CPU"
)
@pytest.mark.parametrize("shared", [True, False])
def test_int8_medusa_drafting_proposes_what_float_drafting_does(stories260k, shared):
    torch.manual_seed(0)
    config = HeadsConfig(
        3, 1, stories260k.hidden_size, stories260k.vocab_size, shared_lm_head=shared
    )
    heads = MedusaHeads(config)
    heads.init_from_base(stories260k.lm_head.weight.detach())  # own heads: the base's rows
    exact = HeadsDrafter(heads, stories260k, int8=False)
    fast = HeadsDrafter(heads, stories260k, int8=True)
    if not shared:  # the caller's heads keep their float projections
        assert isinstance(heads.lm_heads[0], torch.nn.Linear)
        assert isinstance(fast.heads.lm_heads[0], Int8Linear)
    gen = torch.Generator().manual_seed(1)
    same = total = 0
    for _ in range(20):
        hidden_E = torch.randn(stories260k.hidden_size, generator=gen)
        a = exact.logits(hidden_E, []).topk(4, dim=-1).indices
        b = fast.logits(hidden_E, []).topk(4, dim=-1).indices
        same += sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b))
        total += a.numel()
    assert same / total >= 0.9, (same, total)  # a broken int8 path shares ~4/512 by chance
