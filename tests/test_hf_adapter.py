"""Tree verification equals sequential decoding; the cache holds exactly the kept tokens."""

from __future__ import annotations

import pytest
import torch

from medusa_engine.config import HeadsConfig
from medusa_engine.engine import build_engine
from medusa_engine.heads import MedusaHeads
from medusa_engine.tree import tree_from_name
from tests.helpers import OracleDrafter

MODELS = ["stories260k", "tiny_qwen2", "tiny_mistral"]


def sequential_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of the last position from one plain forward of `ids` (no tree, fresh cache)."""
    session = model.new_session()
    hidden_TE = model.forward(torch.tensor(ids), torch.arange(len(ids)), session)
    return model.logits(hidden_TE[-1])


@pytest.mark.parametrize("name", MODELS)
def test_tree_logits_equal_sequential_logits(name, request):
    model = request.getfixturevalue(name)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, model.vocab_size, (11,), generator=gen).tolist()
    tree = tree_from_name("mc_sim_7b_63", 4)
    tokens_N = torch.randint(3, model.vocab_size, (tree.num_nodes,), generator=gen)

    session = model.new_session()
    model.forward(torch.tensor(prompt), torch.arange(len(prompt)), session)
    session.commit(0, prompt)
    hidden_NE = model.forward(tokens_N, tree.depth_N + len(prompt), session, tree.mask_NN)
    tree_logits_NV = model.logits(hidden_NE)

    errors = []
    for node in range(tree.num_nodes):
        ancestors = torch.nonzero(tree.mask_NN[node]).flatten()  # root..node, in depth order
        expected_V = sequential_logits(model, prompt + tokens_N[ancestors].tolist())
        errors.append((tree_logits_NV[node] - expected_V).abs().max().item())
    assert max(errors) <= 1e-4, (
        f"{name}: max abs error {max(errors):.2e}, mean {sum(errors) / len(errors):.2e}"
    )


def cache_rows(session) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in session.cache.layers]


@pytest.mark.parametrize("name", ["stories260k", "tiny_qwen2"])
def test_cache_after_each_step_equals_sequential_decoding(name, request):
    model = request.getfixturevalue(name)
    prompt = [1, 403, 407, 261, 378] if name == "stories260k" else [5, 17, 3, 44, 9]
    ref = model.model.generate(
        torch.tensor([prompt]),
        max_new_tokens=48,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    # The truth sits at rank 1 of head 0: kept paths jump across the tree, so compaction gathers.
    drafter = OracleDrafter(ref, len(prompt), 4, model.vocab_size, truth_rank=1)
    engine = build_engine(model, drafter, "cpu_16")
    session = model.new_session()
    steps = 0
    for _ in engine.stream(prompt, 48, session=session, eos_token_ids=[]):
        fresh = model.new_session()
        ids = session.token_ids
        model.forward(torch.tensor(ids), torch.arange(len(ids)), fresh)
        for (k, v), (k_ref, v_ref) in zip(cache_rows(session), cache_rows(fresh)):
            assert k.shape == k_ref.shape, (k.shape, k_ref.shape)
            torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
        steps += 1
    assert steps > 5
    assert session.token_ids[len(prompt) :] == ref[:-1]


def test_heads_are_projected_through_the_shared_lm_head(stories260k):
    heads = MedusaHeads(HeadsConfig(3, 2, stories260k.hidden_size, stories260k.vocab_size))
    hidden_E = torch.randn(stories260k.hidden_size)
    logits_KV = heads(hidden_E[None], stories260k.lm_head)[0]
    # Zero-initialised blocks are the identity: every head equals the base LM head.
    for k in range(3):
        torch.testing.assert_close(logits_KV[k], stories260k.logits(hidden_E))
