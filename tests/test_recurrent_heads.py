"""Recurrent draft heads: tree drafting == per-path drafting, greedy equivalence, save/load,
training on cached features (loss down, only heads change, resume == uninterrupted), and the CLI.
stories260k (fp32), tiny data.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from medusa_engine.config import HeadsConfig, HeadsError
from medusa_engine.drafters import RecurrentDrafter, depth_plans
from medusa_engine.engine import build_engine
from medusa_engine.heads_io import load_heads, save_heads
from medusa_engine.int8_linear import Int8Linear, int8_supported
from medusa_engine.recurrent_heads import RecurrentHeads
from medusa_engine.training import cli, recurrent
from medusa_engine.training.config import TrainConfig
from medusa_engine.training.data import encode_dataset, load_records
from medusa_engine.training.features import compute_features
from medusa_engine.tree import tree_from_name
from tests.conftest import PROMPTS
from tests.helpers import random_recurrent

STORIES = (
    Path(__file__).resolve().parents[1] / "data" / "train" / "tinystories_train_sample_2MiB.txt"
)


@pytest.fixture(scope="module")
def examples(stories260k, tmp_path_factory):
    docs = STORIES.read_text("utf-8").split("<|endoftext|>")[:40]
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("<|endoftext|>".join(docs))
    return encode_dataset(stories260k.tokenizer, load_records(str(path)), max_length=64)


def cfg(**kw) -> TrainConfig:
    base = dict(kind="recurrent", num_heads=3, batch_size=64, precision="fp32", lr=3e-3, steps=6,
                checkpoint_every=3, ffn_size=64, draft_vocab=256)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("tree_name", ["cpu_16", "mc_sim_7b_63", "chain_4"])
def test_tree_drafting_equals_drafting_each_path(stories260k, tree_name):
    # Float weights: int8 activations share a scale per batch, so rows are not independent there.
    drafter = RecurrentDrafter(random_recurrent(stories260k), stories260k, int8=False)
    tree = tree_from_name(tree_name, 4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        hidden_E = torch.randn(stories260k.hidden_size, generator=gen)
        root = torch.randint(stories260k.vocab_size, (), generator=gen)
        tokens = drafter.draft(hidden_E, root, tree, []).tolist()
        parent, depth = tree.parent_N.tolist(), tree.depth_N.tolist()
        rank = ((tree.topk_index_N - 1) % tree.top_k).tolist()
        assert tokens[0] == int(root)
        for i in range(1, tree.num_nodes):
            path, j = [], parent[i]
            while j >= 0:
                path.insert(0, tokens[j])
                j = parent[j]
            top_DR = drafter.path_topk(hidden_E, path, [], tree.top_k)
            assert tokens[i] == int(top_DR[depth[i] - 1, rank[i]]), (tree_name, i)
            assert tokens[i] in set(drafter.vocab_M.tolist())  # only draft-vocabulary tokens


needs_int8 = pytest.mark.skipif(
    not int8_supported(torch.device("cpu")), reason="no quantized int8 engine on this CPU"
)


@needs_int8
def test_int8_drafting_proposes_what_float_drafting_does_and_keeps_the_callers_heads(
    stories260k,
):
    heads = random_recurrent(stories260k)
    exact = RecurrentDrafter(heads, stories260k, int8=False)
    fast = RecurrentDrafter(heads, stories260k, int8=True)
    assert isinstance(heads.fc1, torch.nn.Linear) and isinstance(fast.heads.fc1, Int8Linear)
    tree = tree_from_name("cpu_16", 4)
    gen = torch.Generator().manual_seed(2)
    same = total = 0
    for _ in range(20):
        hidden_E = torch.randn(stories260k.hidden_size, generator=gen)
        root = torch.randint(stories260k.vocab_size, (), generator=gen)
        a, b = exact.draft(hidden_E, root, tree, []), fast.draft(hidden_E, root, tree, [])
        first = tree.depth_N == 1  # later depths follow the (possibly different) parents
        same += len(set(a[first].tolist()) & set(b[first].tolist()))  # the same top-k, in
        total += int(first.sum())  # an order that near-ties may swap
    # 71 of 80 here (random heads: many near-ties); a broken int8 path shares ~k/300 by chance.
    assert same / total >= 0.8, (same, total)


def test_drafting_falls_back_to_float_where_int8_is_not_supported(stories260k, monkeypatch):
    from medusa_engine import drafters

    monkeypatch.setattr(drafters, "int8_supported", lambda device: False)
    heads = random_recurrent(stories260k)
    assert not RecurrentDrafter(heads, stories260k).int8  # the default follows the machine
    with pytest.raises(ValueError, match="int8 drafting needs a CPU"):
        RecurrentDrafter(heads, stories260k, int8=True)


@needs_int8
def test_int8_linear_matches_the_float_product():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(300, 64, generator=gen), torch.randn(300, generator=gen)
    x = torch.randn(3, 5, 64, generator=gen)
    want = torch.nn.functional.linear(x, weight, bias)
    got = Int8Linear(weight, bias)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    assert not int8_supported(torch.device("meta"))


def test_depth_plans_only_advance_nodes_with_children():
    tree = tree_from_name("cpu_16", 4)
    plans = depth_plans(tree)
    parents = set(tree.parent_N.tolist()[1:])
    assert sum(len(p.nodes) for p in plans) == len(parents)
    assert sum(len(p.children) for p in plans) == tree.num_nodes - 1


@pytest.mark.parametrize("tree_name", ["cpu_16", "mc_sim_7b_63"])
def test_greedy_output_equals_plain_greedy(stories260k, tree_name):
    heads = random_recurrent(stories260k, seed=3)
    plain = build_engine(stories260k, None, "plain")
    engine = build_engine(stories260k, heads, tree_name)
    for prompt in PROMPTS[:5]:
        ids = stories260k.tokenizer(prompt)["input_ids"]
        want = plain.generate(ids, 48).token_ids
        assert engine.generate(ids, 48).token_ids == want, prompt


def test_save_load_round_trip(stories260k, tmp_path):
    heads = random_recurrent(stories260k)
    save_heads(heads, tmp_path / "h")
    loaded = load_heads(tmp_path / "h")
    assert isinstance(loaded, RecurrentHeads) and loaded.config == heads.config
    for (k, a), b in zip(heads.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(HeadsError, match="recurrent heads, not medusa heads"):
        load_heads(tmp_path / "h", "medusa")
    bad = HeadsConfig(4, 1, stories260k.hidden_size + 1, stories260k.vocab_size,
                      kind="recurrent", ffn_size=8)  # fmt: skip
    with pytest.raises(HeadsError, match="expect hidden size"):
        RecurrentDrafter(RecurrentHeads(bad), stories260k)
    with pytest.raises(ValueError, match="ffn_size"):
        HeadsConfig(4, 1, 64, 512, kind="recurrent")


def test_features_hold_hidden_states_and_base_choices(stories260k, examples):
    feats = compute_features(stories260k, examples[:3], max_depth=3, batch_size=2)
    offset = 0
    for e in examples[:3]:
        n = len(e.ids) - e.start + 1
        ids = torch.tensor(e.ids)
        session = stories260k.new_session()
        hidden = stories260k.forward(ids, torch.arange(len(ids)), session)[e.start - 1 :]
        torch.testing.assert_close(feats.hidden_TE[offset : offset + n].float(), hidden,
                                   atol=2e-2, rtol=2e-2)  # fmt: skip
        assert feats.tokens_T[offset : offset + n].tolist() == e.ids[e.start - 1 :]
        assert feats.depths_T[offset : offset + n].tolist()[-4:] == [3, 2, 1, 0]
        offset += n


def test_training_lowers_loss_and_changes_only_the_heads(stories260k, examples):
    feats = compute_features(stories260k, examples, max_depth=3)
    pos = feats.select(torch.arange(len(examples)))
    base_before = {k: v.clone() for k, v in stories260k.model.state_dict().items()}
    c = cfg(steps=30, lr=1e-2)
    result = recurrent.train(stories260k, feats, pos, c)
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5, result.losses
    for key, value in stories260k.model.state_dict().items():
        assert torch.equal(value, base_before[key]), f"base parameter {key} changed"
    init = recurrent.make_heads(stories260k, c, result.heads.draft_vocab_M)
    changed = [not torch.equal(a, b) for a, b in zip(init.parameters(), result.heads.parameters())]
    assert all(changed)
    metrics = recurrent.evaluate(stories260k, result.heads, feats, pos)
    assert len(metrics["heads"]) == 3 and metrics["heads"][0]["top1"] > 0.1


def test_confidence_temperatures_minimise_the_held_out_nll(stories260k, examples):
    feats = compute_features(stories260k, examples, max_depth=2)
    pos = feats.select(torch.arange(len(examples)))
    heads = random_recurrent(stories260k, num_heads=2, draft_vocab=stories260k.vocab_size)
    heads.set_draft_vocab(torch.arange(stories260k.vocab_size))
    rows = recurrent.fit_confidence_temperatures(stories260k, heads, feats, pos)
    assert [r["depth"] for r in rows] == [1, 2, 3, 4]  # beyond the trained depths: MAX_UNROLL
    # Depth 1, recomputed here: the NLL of the base model's choice is lowest at the fitted T.
    p_B = pos[:4096]
    state = heads.step(feats.hidden_TE[p_B].float(), stories260k.model.get_input_embeddings()(
        feats.tokens_T[p_B + 1]).float())  # fmt: skip
    z_BV = heads.logits(state, stories260k.lm_head.weight.float()).detach()
    target = feats.argmax_T[p_B + 1]

    def nll(t: float) -> float:
        return float(F.cross_entropy(z_BV / t, target))

    t = rows[0]["temperature"]
    assert nll(t) < min(nll(t * 1.1), nll(t / 1.1), nll(1.0) + 1e-6)
    assert rows[0]["positions"] == len(p_B)
    with pytest.raises(ValueError, match="positive"):
        HeadsConfig(2, 1, 8, 16, kind="recurrent", ffn_size=4, confidence_temperature=(1.0, 0.0))


def test_resume_reaches_the_uninterrupted_weights_bit_for_bit(stories260k, examples, tmp_path):
    feats = compute_features(stories260k, examples, max_depth=3)
    pos = feats.select(torch.arange(len(examples)))
    c = cfg()
    full = recurrent.train(stories260k, feats, pos, c, checkpoint_path=tmp_path / "a.safetensors")

    def interrupt(step, loss, top1):
        if step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        recurrent.train(stories260k, feats, pos, c, checkpoint_path=ckpt, on_step=interrupt)
    resumed = recurrent.train(stories260k, feats, pos, c, checkpoint_path=ckpt, resume=True)
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert full.losses[3:] == resumed.losses
    for (name, a), b in zip(full.heads.state_dict().items(), resumed.heads.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_trains_recurrent_heads_with_a_feature_cache(examples, tmp_path, capsys):
    docs = STORIES.read_text("utf-8").split("<|endoftext|>")[:30]
    data = tmp_path / "stories.txt"
    data.write_text("<|endoftext|>".join(docs))
    out = tmp_path / "heads"
    argv = ["--model", "stories260k", "--data", str(data), "--out", str(out), "--kind",
            "recurrent", "--steps", "2", "--batch-size", "32", "--max-length", "48",
            "--num-heads", "2", "--ffn-size", "32", "--draft-vocab", "128", "--precision", "fp32",
            "--eval-fraction", "0.1",
            "--checkpoint", str(tmp_path / "run" / "state.safetensors")]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    cache = tmp_path / "run" / "features.safetensors"
    assert cache.is_file()
    heads = load_heads(out)
    assert isinstance(heads, RecurrentHeads) and heads.num_heads == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["heads"]) == 2
    assert 0 < metrics["draft_vocab_coverage"] <= 1
    temps = [c["temperature"] for c in metrics["calibration"]]  # fit down to MAX_UNROLL * 2
    assert len(temps) == 4 and heads.config.confidence_temperature == tuple(temps)
    stamp = cache.stat().st_mtime_ns
    # Reuses the cache; bf16 weights (half the file) load into the same heads.
    assert cli.main([*argv, "--out", str(tmp_path / "heads2"), "--save-dtype", "bf16"]) == 0
    assert cache.stat().st_mtime_ns == stamp
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "heads2" / "heads.safetensors"))
    assert (
        saved["fc1.weight"].dtype == torch.bfloat16 and saved["draft_vocab_M"].dtype == torch.int64
    )
    again = load_heads(tmp_path / "heads2")
    torch.testing.assert_close(again.fc1.weight, heads.fc1.weight, atol=1e-2, rtol=1e-2)


def test_reference_answers_join_training_but_not_from_held_out_prompts(tmp_path, capsys):
    records = [{"instruction": f"Tell a story about a {w}.", "input": "",
                "output": f"Once upon a time there was a {w}. The {w} was happy."}
               for w in ["cat", "dog", "bird", "fish", "frog", "bear", "duck", "cow", "pig", "fox"]]  # fmt: skip
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    common = ["--model", "stories260k", "--data", str(data), "--self-distill",
              "--distill-max-new-tokens", "12", "--distill-cache", str(tmp_path / "distill"),
              "--eval-fraction", "0.2", "--steps", "1", "--num-heads", "2", "--precision", "fp32",
              "--batch-size", "16"]  # fmt: skip
    out = tmp_path / "heads"
    argv = [*common, "--out", str(out), "--kind", "recurrent", "--ffn-size", "16",
            "--draft-vocab", "64", "--with-reference-answers",
            "--checkpoint", str(tmp_path / "run" / "state.safetensors")]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_examples"] == 2
    assert metrics["train_examples"] == 8 + 8  # 8 self-distilled + the 8 training prompts' answers
    assert cli.main([*common, "--out", str(tmp_path / "m"), "--with-reference-answers"]) == 2
    assert "needs --kind recurrent" in capsys.readouterr().err


def test_bundled_default_model_heads_and_tree_load():
    from types import SimpleNamespace

    from medusa_engine.dynamic_tree import DynamicTree
    from medusa_engine.models import ASSETS
    from medusa_engine.tree import TreeBuffers, build_tree
    from medusa_engine.tree_spec import parse_tree

    folder = ASSETS / "heads" / "smollm2-135m-instruct"
    heads = load_heads(folder)
    assert isinstance(heads, RecurrentHeads)
    assert (heads.config.hidden_size, heads.config.vocab_size) == (576, 49152)
    assert heads.draft_vocab_M.unique().numel() == heads.config.draft_vocab  # distinct ids
    tuned = json.loads((folder / "tree.json").read_text())  # a `tune-tree --out` file
    tree = build_tree([tuple(p) for p in tuned["paths"]], heads.num_heads)  # its best static tree
    assert 1 < tree.num_nodes <= 128
    drafter = SimpleNamespace(
        num_heads=heads.num_heads,
        max_depth=2 * heads.num_heads,
        draft_vocab_size=heads.config.draft_vocab,
    )
    resolved = parse_tree(str(folder / "tree.json"), drafter)  # what `--tree default` runs
    if tuned.get("dynamic_nodes"):
        assert isinstance(resolved, DynamicTree) and resolved.nodes == tuned["dynamic_nodes"]
    else:
        assert isinstance(resolved, TreeBuffers)
        assert torch.equal(resolved.paths_PL, tree.paths_PL)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["heads"]) == heads.num_heads


def test_prompt_lookup_guess():
    from medusa_engine.drafters import lookup

    #          0  1  2  3  4  5  6  7  8  9
    history = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 5, 6, 7]
    assert lookup(history, 3) == ([2, 5, 6], 3)  # the latest earlier "5 6 7" is at 6..8
    assert lookup([1, 2, 3, 4, 9, 2], 2) == ([3, 4], 1)  # only a 1-gram matches
    assert lookup([1, 2, 3], 4) == ([], 0)


def test_lookup_branch_length_follows_the_match():
    from medusa_engine.drafters import LookupBranch

    branch = LookupBranch(16)
    assert [branch.length_for(n) for n in range(4)] == [0, 4, 8, 16]
    text = list(range(100, 140))  # no repeats: no branch
    assert branch.guess(text) == []
    assert branch.guess([*text, 120]) == list(range(121, 125))  # 1-gram: 4 tokens
    assert branch.guess([*text, 119, 120]) == list(range(121, 129))  # 2-gram: 8
    assert branch.guess([*text, 118, 119, 120]) == list(range(121, 137))  # 3-gram: 16
    assert branch.guess([*text, 137, 138, 139, 137, 138]) == [139, 137, 138]  # runs out of text
    tree = tree_from_name("cpu_16", 4)
    assert branch.tree(tree, 3) is branch.tree(tree, 3)
    assert branch.tree(tree, 3).num_nodes == 17 + 3


@pytest.mark.parametrize("heads_kind", ["recurrent", "none"])
def test_lookup_branch_keeps_greedy_output_and_gets_accepted(stories260k, heads_kind):
    from medusa_engine.drafters import with_lookup_branch

    tree = with_lookup_branch(tree_from_name("cpu_16", 4), 5)
    assert tree.num_nodes == 22 and tree.max_depth == 5
    assert tree.mask_NN[21].nonzero()[:, 0].tolist() == [0, 17, 18, 19, 20, 21]
    heads = random_recurrent(stories260k, seed=5) if heads_kind == "recurrent" else None
    plain = build_engine(stories260k, None, "plain")
    engine = build_engine(stories260k, heads, "cpu_16" if heads else "plain", lookup=8)
    accepted = 0
    for prompt in PROMPTS[:6]:
        # A repeated sentence: the continuation copies it, so the branch must pay off somewhere.
        ids = stories260k.tokenizer(f"{prompt}. {prompt}. {prompt}")["input_ids"]
        want = plain.generate(ids, 40).token_ids
        got = engine.generate(ids, 40)
        assert got.token_ids == want, prompt
        accepted += sum(n - 1 for n in got.accepted_lengths)
    assert accepted > 0


def test_extra_sampled_distill_pass_joins_training_but_not_from_held_out_prompts(tmp_path, capsys):
    records = [{"instruction": f"Tell a story about a {w}.", "input": "", "output": "Once."}
               for w in ["cat", "dog", "bird", "fish", "frog", "bear", "duck", "cow", "pig", "fox"]]  # fmt: skip
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    cache = tmp_path / "distill"
    argv = ["--model", "stories260k", "--data", str(data), "--self-distill",
            "--distill-max-new-tokens", "12", "--distill-cache", str(cache),
            "--extra-distill-temperature", "0.8", "--eval-fraction", "0.2", "--steps", "1",
            "--num-heads", "2", "--precision", "fp32", "--batch-size", "16", "--kind", "recurrent",
            "--ffn-size", "16", "--draft-vocab", "64", "--out", str(tmp_path / "heads"),
            "--checkpoint", str(tmp_path / "run" / "state.safetensors")]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "heads" / "metrics.json").read_text())
    assert metrics["eval_examples"] == 2
    assert metrics["train_examples"] == 8 + 8  # greedy answers + sampled answers, 8 prompts each
    sampled = tmp_path / "distill-t0.8-s1"  # its own cache, seeded seed + 1
    assert json.loads((sampled / "meta.json").read_text())["temperature"] == 0.8
    greedy, other = (
        datasets.load_from_disk(str(next(c.glob("shard-*")))) for c in (cache, sampled)
    )
    assert greedy["input_ids"] != other["input_ids"]  # sampling changed some answers
    no_distill = [a for a in argv if a != "--self-distill"]
    assert cli.main(no_distill) == 2
    assert "needs --self-distill" in capsys.readouterr().err
