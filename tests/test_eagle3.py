"""EAGLE-3 drafter (medusa_engine/eagle3.py) in the decode loop: lossless greedy decoding on static
and dynamic trees, a tree drafted at once equals each path drafted alone, the draft cache carried
across steps equals one built from scratch, and the aux hidden states come from the verification
forward itself (hf_adapter/aux_hidden.py)."""

from __future__ import annotations

import pytest
import torch

from medusa_engine.config import HeadsError, SamplingConfig
from medusa_engine.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Heads, default_aux_layers
from medusa_engine.engine import build_engine
from medusa_engine.generate import MedusaGenerator
from medusa_engine.hf_adapter.aux_hidden import AuxCapture
from medusa_engine.tree import build_tree, tree_from_name


def random_eagle3(model, num_heads: int = 3, draft_vocab: int = 256, seed: int = 0) -> Eagle3Heads:
    """Random EAGLE-3 heads shaped for `model` (stories260k: E 64, 8/4 heads of 8), scoring a
    random draft vocabulary; weights scaled up so that drafts depend on their inputs."""
    c = model.text_config
    config = Eagle3Config(
        hidden_size=model.hidden_size,
        vocab_size=model.vocab_size,
        draft_vocab_size=draft_vocab,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        intermediate_size=c.intermediate_size,
        rms_norm_eps=c.rms_norm_eps,
        aux_layers=default_aux_layers(c.num_hidden_layers),
        num_heads=num_heads,
    )
    g = torch.Generator().manual_seed(seed)
    heads = Eagle3Heads(config)
    with torch.no_grad():
        for p in heads.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:  # norms: not all ones, so that a swapped norm shows
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    heads.set_draft_vocab(torch.randperm(model.vocab_size, generator=g)[:draft_vocab].sort().values)
    return heads


@pytest.fixture(scope="module")
def heads(stories260k):
    return random_eagle3(stories260k)


def plain_greedy(model, prompt, n):
    return MedusaGenerator(model, None, build_tree([], 0)).generate(prompt, n).token_ids


@pytest.mark.parametrize("tree", ["cpu_8", "mc_sim_7b_63", "dynamic:16", "dynamic:24:8:4:6"])
def test_greedy_output_equals_plain_greedy(stories260k, prompt_ids, heads, tree):
    engine = build_engine(stories260k, heads, tree, lookup=8)
    try:
        for prompt in prompt_ids[:4]:
            result = engine.generate(prompt, 48)
            assert result.token_ids == plain_greedy(stories260k, prompt, 48)
    finally:
        engine.drafter.capture.close()


def test_sampling_runs_with_every_rule(stories260k, prompt_ids, heads):
    """The drafter's state survives the sampling rules' other acceptance paths."""
    for acceptance in ("lossless", "typical"):
        sampling = SamplingConfig(temperature=0.8, acceptance=acceptance, seed=1)
        engine = build_engine(stories260k, heads, "dynamic:16", sampling)
        try:
            result = engine.generate(prompt_ids[0], 32)
            assert len(result.token_ids) == 32 and result.finish_reason == "length"
        finally:
            engine.drafter.capture.close()


def test_a_tree_drafted_at_once_equals_each_path_drafted_alone(stories260k, prompt_ids, heads):
    """The tree mask: every node's token is the top-rank proposal after its own path only."""
    drafter = Eagle3Drafter(heads, stories260k, int8=False)  # int8 rows depend on their batch
    try:
        engine = MedusaGenerator(stories260k, drafter, build_tree([], 0))
        session = stories260k.new_session()
        state = engine.prefill(prompt_ids[1], session)
        tree = tree_from_name("mc_sim_7b_63", 3).to(stories260k.device)
        root = torch.tensor(state.root)
        tokens_N = drafter.draft(state.hidden_E, root, tree, session.token_ids)
        paths = tree.paths_PL.tolist()
        ranks = ((tree.topk_index_N - 1) % tree.top_k).tolist()
        for path in paths:
            nodes = [n for n in path if n >= 0]
            chain = [int(tokens_N[n]) for n in nodes]
            top_LR = drafter.path_topk(state.hidden_E, chain, session.token_ids, tree.top_k)
            for d, node in enumerate(nodes[1:]):
                assert int(top_LR[d, ranks[node]]) == chain[d + 1], (path, d)
    finally:
        drafter.capture.close()


def test_the_draft_cache_carried_across_steps_equals_one_built_from_scratch(
    stories260k, prompt_ids, heads
):
    """After each step, a fresh drafter that adopts one teacher-forced forward over the text
    proposes what the drafter that kept its cache across the steps proposes."""
    drafter = Eagle3Drafter(heads, stories260k, int8=False)
    engine = MedusaGenerator(stories260k, drafter, tree_from_name("cpu_8", 3))
    session = stories260k.new_session(256)
    state = engine.prefill(prompt_ids[2], session)
    fresh = Eagle3Drafter(heads, stories260k, int8=False)
    try:
        for _ in range(6):
            state, _emitted = engine.step(state, session)
            path = [state.root, *plain_greedy(stories260k, [*session.token_ids, state.root], 3)]
            kept = drafter.path_topk(state.hidden_E, path, session.token_ids, 4)
            with torch.inference_mode():
                ids = torch.tensor(session.token_ids)
                stories260k.forward(ids, torch.arange(len(ids)), stories260k.new_session())
            again = fresh.path_topk(state.hidden_E, path, session.token_ids, 4)
            assert torch.equal(kept, again)
            fresh.memory = type(fresh.memory)(fresh.heads, fresh.device, fresh.dtype)
    finally:
        drafter.capture.close()
        fresh.capture.close()


def test_aux_states_are_the_layer_outputs_of_the_same_forward(stories260k, prompt_ids):
    capture = AuxCapture(stories260k, (0, 2, 3))
    calls = []
    counter = stories260k.decoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        ids = torch.tensor(prompt_ids[3])
        with torch.inference_mode():
            stories260k.forward(ids, torch.arange(len(ids)), stories260k.new_session())
            out = stories260k.model.model(ids[None], output_hidden_states=True)
        assert len(calls) == 2  # ours, then the reference: the capture added no forward
        want = torch.cat([out.hidden_states[k + 1][0] for k in (0, 2, 3)], dim=-1)
        torch.testing.assert_close(capture.rows(), want)
    finally:
        counter.remove()
        capture.close()


def test_generation_runs_one_base_forward_per_step(stories260k, prompt_ids, heads):
    engine = build_engine(stories260k, heads, "cpu_8")
    calls = []
    counter = stories260k.decoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        result = engine.generate(prompt_ids[4], 32)
        assert len(calls) == result.steps + 1  # the prefill, then one verification per step
    finally:
        counter.remove()
        engine.drafter.capture.close()


def test_heads_for_another_model_or_layers_are_one_line_errors(stories260k, tiny_qwen2, heads):
    with pytest.raises(HeadsError, match="expect hidden size 64"):
        Eagle3Drafter(heads, tiny_qwen2)
    with pytest.raises(HeadsError, match="do not fit"):
        AuxCapture(stories260k, (0, 2, 5))


def test_default_aux_layers_are_distinct_low_middle_high():
    assert default_aux_layers(30) == (1, 14, 26)  # the inputs of layers 2, L/2, L - 3
    assert default_aux_layers(5) == (0, 2, 3)  # too shallow for those: spread instead


def test_training_time_test_sees_what_drafting_sees(stories260k, prompt_ids, heads):
    """`training.eagle3.unroll` (the training forward, all chains at once) gives the logits the
    drafter computes step by step along the same tokens: training matches drafting."""
    from medusa_engine.training.eagle3 import base_features, unroll

    ids = prompt_ids[5] + plain_greedy(stories260k, prompt_ids[5], 12)
    ids_1T = torch.tensor([ids])
    with torch.no_grad():
        aux_1TX, _ = base_features(stories260k, ids_1T, heads.config.aux_layers)
        states_J = unroll(heads, aux_1TX[:, :-1], stories260k.embed_tokens(ids_1T), 3)
    drafter = Eagle3Drafter(heads, stories260k, int8=False)
    try:
        for p in (len(prompt_ids[5]) - 1, len(ids) - 5):
            with torch.inference_mode():
                all_ids = torch.tensor(ids)
                stories260k.forward(all_ids, torch.arange(len(ids)), stories260k.new_session())
                expand = drafter._expander(ids[: p + 1], torch.tensor(ids[p + 1]))
                row = torch.zeros(1, dtype=torch.int64)
                for j in range(3):
                    got = expand(row, torch.tensor([ids[p + 1 + j]]))[0]
                    want = heads.logits(states_J[j][0, p])
                    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        drafter.capture.close()


def test_training_lowers_the_loss_and_resumes_bit_for_bit(stories260k, prompt_ids, tmp_path):
    from medusa_engine.training.config import TrainConfig
    from medusa_engine.training.data import Example
    from medusa_engine.training.eagle3 import evaluate, train

    examples = [Example(p + plain_greedy(stories260k, p, 24), len(p)) for p in prompt_ids[:8]]
    cfg = TrainConfig(
        kind="eagle3", num_heads=2, batch_size=2, steps=6, lr=3e-3, precision="fp32",
        draft_vocab=128, checkpoint_every=3,
    )  # fmt: skip
    whole = train(stories260k, examples, cfg)
    assert whole.losses[-1] < whole.losses[0]

    def interrupt(step, loss, top1):
        if step == 3:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(stories260k, examples, cfg, checkpoint, on_step=interrupt)
    resumed = train(stories260k, examples, cfg, checkpoint, resume=True)
    assert resumed.step == 6 and whole.losses[3:] == resumed.losses
    for (name, a), b in zip(whole.heads.state_dict().items(), resumed.heads.state_dict().values()):
        assert torch.equal(a, b), name
    metrics = evaluate(stories260k, whole.heads, examples[:4], precision="fp32")
    assert len(metrics["heads"]) == 2 and len(metrics["calibration"]) == 4  # unrolled 2 x 2
    assert all(0 <= h["top1"] <= h["top5"] <= 1 for h in metrics["heads"])


def test_cached_features_train_as_features_computed_per_batch(stories260k, prompt_ids, tmp_path):
    """The disk cache of the base features (`compute_features`, bf16) trains the heads as the
    features computed per batch do (up to bf16 rounding), and is refused for other examples."""
    from medusa_engine.training.config import TrainConfig
    from medusa_engine.training.data import Example
    from medusa_engine.training.eagle3 import (
        compute_features,
        load_features,
        save_features,
        train,
    )

    examples = [Example(p + plain_greedy(stories260k, p, 16), len(p)) for p in prompt_ids[:6]]
    cfg = TrainConfig(
        kind="eagle3", num_heads=2, batch_size=2, steps=3, lr=3e-3, precision="fp32",
        draft_vocab=128,
    )  # fmt: skip
    layers = default_aux_layers(stories260k.text_config.num_hidden_layers)
    path = tmp_path / "features.safetensors"
    save_features(path, compute_features(stories260k, examples, layers, batch_size=4), "k1")
    assert load_features(path, "k2") is None  # other examples or layers: recomputed
    features = load_features(path, "k1")
    assert features is not None and len(features) == 6
    assert features.aux_TX.shape == (sum(len(e.ids) for e in examples), 3 * stories260k.hidden_size)
    cached = train(stories260k, examples, cfg, features=features)
    fresh = train(stories260k, examples, cfg)
    torch.testing.assert_close(
        torch.tensor(cached.losses), torch.tensor(fresh.losses), rtol=2e-2, atol=0
    )
    assert cached.losses != fresh.losses  # the cache was read (bf16), not the base model


def test_cli_trains_eagle3_heads_with_a_feature_cache(tmp_path, capsys):
    from medusa_engine.heads_io import load_heads
    from medusa_engine.training import cli
    from tests.test_recurrent_heads import STORIES

    data = tmp_path / "stories.txt"
    data.write_text("<|endoftext|>".join(STORIES.read_text("utf-8").split("<|endoftext|>")[:20]))
    argv = ["--model", "stories260k", "--data", str(data), "--out", str(tmp_path / "heads"),
            "--kind", "eagle3", "--steps", "2", "--batch-size", "4", "--max-length", "48",
            "--num-heads", "2", "--draft-vocab", "128", "--precision", "fp32",
            "--eval-fraction", "0.2", "--checkpoint", str(tmp_path / "run" / "state.safetensors")]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    cache = tmp_path / "run" / "eagle3_features.safetensors"
    heads = load_heads(tmp_path / "heads")
    assert cache.is_file() and isinstance(heads, Eagle3Heads) and heads.num_heads == 2
    stamp = cache.stat().st_mtime_ns
    assert cli.main([*argv, "--out", str(tmp_path / "heads2")]) == 0  # reuses the cache
    assert cache.stat().st_mtime_ns == stamp
    again = load_heads(tmp_path / "heads2")
    for (name, a), b in zip(heads.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_calibration_reads_the_same_ranks_in_any_order(stories260k, prompt_ids, heads):
    """Tree tuning drafts at positions of several texts after their forwards (`calibration`):
    the drafter finds or recomputes each text's features, so the order does not matter."""
    from medusa_engine.calibration import calibration_positions, head_ranks

    engine = build_engine(stories260k, Eagle3Drafter(heads, stories260k, int8=False), "cpu_8")
    try:
        prompts = [prompt_ids[6], prompt_ids[7]]
        positions = list(calibration_positions(engine, prompts, 12))
        forward = head_ranks(engine, positions, 4)
        backward = head_ranks(engine, positions[::-1], 4).flip(0)
        assert torch.equal(forward, backward) and (forward < 4).any()
    finally:
        engine.drafter.capture.close()


def test_a_reused_session_drafts_as_a_fresh_one(stories260k, prompt_ids, heads):
    """The draft cache follows the session across requests (kept prefix, truncation)."""
    engine = build_engine(stories260k, heads, "dynamic:12")
    try:
        session = stories260k.new_session()
        first = engine.generate(prompt_ids[0], 20, session=session)
        follow = prompt_ids[0] + first.token_ids + prompt_ids[3][1:]
        again = engine.generate(follow, 30, session=session)
        fresh = build_engine(stories260k, heads, "dynamic:12").generate(follow, 30)
        assert again.token_ids == fresh.token_ids
        assert again.accepted_lengths == fresh.accepted_lengths
    finally:
        engine.drafter.capture.close()


def test_the_capture_hooks_go_with_the_drafter(stories260k, heads):
    import gc

    layer = stories260k.decoder.layers[heads.config.aux_layers[0]]
    before = len(layer._forward_hooks), len(stories260k.decoder._forward_pre_hooks)
    drafter = Eagle3Drafter(heads, stories260k)
    assert len(layer._forward_hooks) == before[0] + 1
    del drafter
    gc.collect()
    assert (len(layer._forward_hooks), len(stories260k.decoder._forward_pre_hooks)) == before


class LoudFirstPosition:
    """An aux capture whose first position is 1000x louder, as a real model's first token is
    in its residual stream (SmolLM2: orders of magnitude above the other positions)."""

    def __init__(self, inner: AuxCapture) -> None:
        self.inner = inner

    def rows(self) -> torch.Tensor:
        rows = self.inner.rows().clone()
        rows[0] *= 1000
        return rows

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.inputs()


@pytest.mark.parametrize("loud_first_position", [False, True])
def test_int8_drafting_proposes_what_float_drafting_does(
    stories260k, prompt_ids, heads, loud_first_position
):
    """Also when one position's features dwarf the others: an int8 product quantises all its
    rows with one scale, so the fusion of a whole prompt's features must not go through one."""
    tree = tree_from_name("mc_sim_7b_63", 3)
    drafts = []
    for int8 in (False, True):
        capture = AuxCapture(stories260k, heads.config.aux_layers)
        if loud_first_position:
            capture = LoudFirstPosition(capture)
        drafter = Eagle3Drafter(heads, stories260k, capture=capture, int8=int8)
        engine = MedusaGenerator(stories260k, drafter, build_tree([], 0))
        session = stories260k.new_session()
        state = engine.prefill(prompt_ids[8], session)
        drafts.append(
            drafter.draft(state.hidden_E, torch.tensor(state.root), tree, session.token_ids)
        )
        (capture.inner if loud_first_position else capture).close()
    assert drafter.heads is not heads and isinstance(heads.fc, torch.nn.Linear)
    assert (drafts[0] == drafts[1]).float().mean() > 0.8


@pytest.mark.slow
def test_lossless_sampling_keeps_the_models_distribution(stories260k, prompt_ids):
    """As tests/test_generate.py checks it for an oracle: at T = 1 the second token (the first a
    verification step decides) follows p(t2 | prompt) exactly, with the bundled eagle3 drafter's
    drafts kept on some steps."""
    from medusa_engine.heads_io import load_heads
    from medusa_engine.models import ASSETS

    # past the first 16 tokens: where the bundled drafter was trained (its README)
    ids, runs = prompt_ids[0] + plain_greedy(stories260k, prompt_ids[0], 16), 1500
    with torch.inference_mode():
        p1_V = stories260k.model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        batch = torch.tensor([[*ids, t] for t in range(stories260k.vocab_size)])
        p2_VV = stories260k.model(batch).logits[:, -1].float().softmax(-1)
    exact_t2 = p1_V @ p2_VV
    heads = load_heads(ASSETS / "heads" / "stories260k-eagle3")
    sampling = SamplingConfig(temperature=1.0, acceptance="lossless", seed=0)
    engine = build_engine(stories260k, heads, "dynamic:16", sampling, lookup=0)
    pairs, kept = [], 0
    for _ in range(runs):
        result = engine.generate(ids, 2)
        pairs.append(result.token_ids[:2])
        kept += result.accepted_lengths[0] > 1
    assert kept > runs // 20, kept
    t2_R = torch.tensor(pairs)[:, 1]
    empirical = torch.bincount(t2_R, minlength=stories260k.vocab_size) / runs
    sigma = (exact_t2 * (1 - exact_t2) / runs).sqrt()
    assert ((empirical - exact_t2).abs() <= 4.5 * sigma + 0.01).all()


def test_the_bundled_drafter_is_lossless_and_accepts_drafts(stories260k, prompt_ids):
    from medusa_engine.heads_io import load_heads
    from medusa_engine.models import ASSETS

    heads = load_heads(ASSETS / "heads" / "stories260k-eagle3")
    engine = build_engine(stories260k, heads, "dynamic:16")
    for prompt in prompt_ids[10:12]:
        result = engine.generate(prompt, 64)
        assert result.token_ids == plain_greedy(stories260k, prompt, 64)
        assert result.mean_accepted > 1.5, result.accepted_lengths
