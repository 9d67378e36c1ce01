"""Batched decoding and continuous batching: every row equals its batch-1 decode (fp32 greedy)
whatever its neighbours do; lossless sampling keeps the model's distribution with neighbours
present; the row cache and per-row masks equal their one-row references."""

from __future__ import annotations

import pytest
import torch

from attention.api import attention, attention_static, prepare_static
from attention.masks import padded_mask_BQS
from attention.row_kv_cache import RowKVCache
from medusa_engine.batch import BatchDecoder, RowState
from medusa_engine.config import SamplingConfig
from medusa_engine.engine import build_engine
from medusa_engine.hf_adapter import HFModel
from medusa_engine.model import ContextOverflowError
from medusa_engine.scheduler import (
    Event,
    QueueFullError,
    Request,
    Scheduler,
    SchedulerClosedError,
    generate_all,
)
from tests.helpers import OracleDrafter, random_heads, random_recurrent


@pytest.fixture(scope="module")
def model() -> HFModel:
    torch.manual_seed(0)
    return HFModel.load("stories260k", dtype="fp32", attention="sdpa")


@pytest.fixture(scope="module")
def heads(model):
    return random_heads(model, num_heads=3, seed=1)


@pytest.fixture(scope="module")
def prompts(model, prompt_ids) -> list[list[int]]:
    return prompt_ids[:8]


# ---- the row cache and per-row masks -----------------------------------------------------------


def test_per_row_tree_masks_equal_each_rows_own_mask():
    torch.manual_seed(0)
    q, s = 5, 12
    kv_len_B = torch.tensor([7, 12, 5], dtype=torch.int32)
    block_BQQ = torch.rand(3, q, q) < 0.5
    block_BQQ |= torch.eye(q, dtype=torch.bool)
    mask_BQS = padded_mask_BQS(q, s, kv_len_B, block_QQ=block_BQQ)
    for b in range(3):
        alone = padded_mask_BQS(q, s, kv_len_B[b : b + 1], block_QQ=block_BQQ[b])
        assert torch.equal(mask_BQS[b], alone[0])
    with pytest.raises(ValueError, match="sdpa or reference"):
        prepare_static("triton", q, s, kv_len_B, tree_mask_QQ=block_BQQ)


def test_row_cache_step_equals_attention_over_each_rows_own_keys():
    """Rows of different lengths written and attended in one batch, then compacted, hold
    exactly what each row alone holds."""
    torch.manual_seed(0)
    layers, g, d, t = 2, 2, 8, 4
    cache = RowKVCache.allocate(num_layers=layers, rows=3, kv_heads=g, head_dim=d, max_length=32)
    prefix = [5, 9, 2]
    own = []  # each row's keys/values, built one row at a time
    for r, n in enumerate(prefix):
        k = torch.randn(layers, 1, g, n, d)
        v = torch.randn(layers, 1, g, n, d)
        write = cache.begin(range(r, r + 1), n)
        for layer in range(layers):
            write.write(layer, k[layer], v[layer])
        own.append((k, v))
    k_new = torch.randn(layers, 3, g, t, d)
    v_new = torch.randn(layers, 3, g, t, d)
    q = torch.randn(3, 4, t, d)
    block = torch.tril(torch.ones(t, t, dtype=torch.bool))
    write = cache.begin(range(3), t)
    assert write.k_len == max(prefix) + t
    mask = prepare_static("sdpa", t, write.k_len, write.kv_len_B, tree_mask_QQ=block)
    for layer in range(layers):
        keys, values = write.write(layer, k_new[layer], v_new[layer])
        out = attention_static(q, keys, values, mask)
        for r in range(3):
            k_r = torch.cat([own[r][0][layer], k_new[layer, r : r + 1]], dim=2)
            v_r = torch.cat([own[r][1][layer], v_new[layer, r : r + 1]], dim=2)
            ref = attention(q[r : r + 1], k_r, v_r, backend="reference", tree_mask_QQ=block)
            torch.testing.assert_close(out[r : r + 1], ref.to(out.dtype), atol=1e-5, rtol=1e-5)
    keep = [[0, 2], [0], [0, 1, 3]]
    cache.compact(range(3), prefix, keep)
    assert cache.lengths == [p + len(k) for p, k in zip(prefix, keep)]
    for r, kept in enumerate(keep):
        n = prefix[r]
        want = torch.cat([own[r][0][:, 0], k_new[:, r][:, :, kept]], dim=2)
        assert torch.equal(cache.keys[:, r, :, : n + len(kept)], want)
    cache.move_row(2, 1)
    assert cache.lengths == [7, 5, 0]
    cache.resize(4, 64)
    assert cache.lengths == [7, 5, 0, 0] and cache.max_length == 64
    assert torch.equal(cache.keys[:, 1, :, :5], torch.cat([own[2][0][:, 0], k_new[:, 2][:, :, [0, 1, 3]]], 2)[:, :, :5])  # fmt: skip


# ---- greedy rows equal batch-1 decoding ----------------------------------------------------------


def _batch1(engine, prompt, max_new):
    return engine.generate(prompt, max_new).token_ids


@pytest.mark.parametrize(
    ("tree", "lookup"), [("cpu_16", 0), ("cpu_16", 8), ("dynamic:12", 0), ("plain", 0)]
)
def test_every_row_equals_its_batch1_output(model, heads, prompts, tree, lookup):
    """Different prompt lengths and token budgets (rows finish at different steps), more
    requests than rows (rows join mid-flight as others leave), prefill in chunks."""
    engine = build_engine(model, None if tree == "plain" else heads, tree, lookup=lookup)
    budgets = [20 + 11 * i for i in range(len(prompts))]
    want = [_batch1(engine, p, n) for p, n in zip(prompts, budgets)]
    scheduler = Scheduler(engine, max_batch=3, prefill_chunk=4)
    got = generate_all(scheduler, [Request(tuple(p), n) for p, n in zip(prompts, budgets)])
    for (tokens, final), ref in zip(got, want):
        assert tokens == ref
        assert final.finish_reason in ("length", "eos") and final.completion_tokens == len(ref)
    stats = scheduler.stats()
    assert stats.running == stats.queued == stats.kv_bytes_in_use == 0
    assert stats.requests_total == len(prompts)


def test_rows_equal_hf_generate(model, heads, prompts, stories260k):
    engine = build_engine(model, heads, "cpu_16")
    got = generate_all(Scheduler(engine, max_batch=4), [Request(tuple(p), 40) for p in prompts])
    for (tokens, _), ids in zip(got, prompts):
        ref = stories260k.model.generate(  # the model's own attention
            torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0
        )
        assert tokens == ref[0, len(ids) :].tolist()


def test_a_row_joining_mid_flight_and_a_cancelled_row_leave_the_others_unchanged(
    model, heads, prompts
):
    engine = build_engine(model, heads, "cpu_16", lookup=8)
    want = [_batch1(engine, p, 60) for p in prompts[:3]]
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=3)
    tokens: dict[int, list[int]] = {}
    finals: dict[int, Event] = {}

    def on_event(event: Event) -> None:
        tokens.setdefault(event.request_id, []).extend(event.tokens)
        if event.finish_reason:
            finals[event.request_id] = event

    first = scheduler.submit(Request(tuple(prompts[0]), 60), on_event)
    doomed = scheduler.submit(Request(tuple(prompts[3]), 60), on_event)
    for _ in range(8):
        scheduler.step()
    scheduler.cancel(doomed)
    late = scheduler.submit(Request(tuple(prompts[1]), 60), on_event)
    scheduler.step()
    assert finals[doomed].finish_reason == "cancelled"
    scheduler.step()
    later = scheduler.submit(Request(tuple(prompts[2]), 60), on_event)
    scheduler.run_until_idle()
    assert [tokens[i] for i in (first, late, later)] == want
    assert scheduler.stats().kv_bytes_in_use == 0


# ---- sampling per row -------------------------------------------------------------------------


def test_a_seeded_request_does_not_depend_on_its_neighbours(model, heads, prompts):
    engine = build_engine(model, heads, "cpu_16")
    sampling = SamplingConfig(temperature=0.8, acceptance="lossless", seed=7)
    alone = generate_all(Scheduler(engine), [Request(tuple(prompts[0]), 40, sampling)])
    neighbours = [
        Request(tuple(p), 30, SamplingConfig(temperature=1.0, seed=i)) for i, p in enumerate(prompts[1:5])
    ]  # fmt: skip
    crowd = generate_all(
        Scheduler(engine, max_batch=5), [*neighbours[:2], Request(tuple(prompts[0]), 40, sampling), *neighbours[2:]]
    )  # fmt: skip
    assert crowd[2][0] == alone[0][0]


def test_lossless_sampling_per_row_keeps_the_models_distribution(model, prompt_ids, stories260k):
    """At T = 1, each request's second token (decided by a batched verification step, with
    neighbours in the batch) follows p(t2 | prompt) = sum_t1 p(t1) p(t2 | t1), computed exactly."""
    ids, runs, hf = prompt_ids[0], 700, stories260k.model
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        p1_V = hf(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        batch = torch.tensor([[*ids, t] for t in range(model.vocab_size)])
        p2_VV = hf(batch).logits[:, -1].float().softmax(-1)
    exact_t2 = p1_V @ p2_VV
    drafter = OracleDrafter(ref[0, len(ids) :].tolist(), len(ids), 4, model.vocab_size)
    engine = build_engine(model, drafter, "cpu_16")
    requests = [
        Request(tuple(ids), 3, SamplingConfig(temperature=1.0, acceptance="lossless", seed=i))
        for i in range(runs)
    ]
    results = generate_all(Scheduler(engine, max_batch=8, max_queue=runs), requests)
    t2_R = torch.tensor([tokens[1] for tokens, _ in results])
    # One step to the third token: its first emitted token, t2, was a kept draft.
    kept = sum(final.steps == 1 for _, final in results)
    assert kept > runs // 3, kept
    empirical = torch.bincount(t2_R, minlength=model.vocab_size) / runs
    sigma = (exact_t2 * (1 - exact_t2) / runs).sqrt()
    worst = (empirical - exact_t2).abs().max()
    assert ((empirical - exact_t2).abs() <= 4.5 * sigma + 0.01).all(), worst


# ---- admission, memory, errors ---------------------------------------------------------------


def test_a_request_that_can_never_fit_is_refused_and_one_that_cannot_fit_yet_waits(model, heads):
    engine = build_engine(model, heads, "cpu_16")
    row_mib = 256 * model.kv_bytes_per_token / 2**20
    scheduler = Scheduler(engine, max_batch=4, kv_budget_mb=2 * row_mib)  # two 256-slot rows
    with pytest.raises(ContextOverflowError, match="budget"):
        scheduler.submit(Request((1, 2, 3), 600), lambda e: None)
    with pytest.raises(ContextOverflowError, match="context"):
        scheduler.submit(Request((1,) * (model.max_context + 1), 1), lambda e: None)
    got = generate_all(scheduler, [Request((1, 2, 3), 100) for _ in range(5)])
    assert all(len(tokens) == 100 or final.finish_reason == "eos" for tokens, final in got)
    stats = scheduler.stats()
    assert stats.kv_bytes_peak <= stats.kv_budget_bytes
    assert stats.kv_bytes_allocated == 2 * 256 * model.kv_bytes_per_token  # never more rows


def test_bad_requests_a_full_queue_and_shutdown(model):
    engine = build_engine(model, None, "plain")
    scheduler = Scheduler(engine, max_queue=1)
    with pytest.raises(ValueError, match="empty"):
        scheduler.submit(Request((), 4), lambda e: None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        scheduler.submit(Request((1,), 0), lambda e: None)
    with pytest.raises(ValueError, match="token ids"):
        scheduler.submit(Request((model.vocab_size,), 4), lambda e: None)
    scheduler.submit(Request((1, 2), 4), lambda e: None)
    with pytest.raises(QueueFullError):
        scheduler.submit(Request((1, 2), 4), lambda e: None)
    scheduler.shutdown(drain=False)
    with pytest.raises(SchedulerClosedError):
        scheduler.submit(Request((1, 2), 4), lambda e: None)
    with pytest.raises(ValueError, match="sdpa"):
        Scheduler(build_engine(HFModel(model.model, attention="hf"), None, "plain"))


def test_the_background_thread_serves_and_drains(model, heads, prompts):
    engine = build_engine(model, heads, "cpu_16")
    want = [_batch1(engine, p, 30) for p in prompts[:4]]
    scheduler = Scheduler(engine, max_batch=2)
    tokens: dict[int, list[int]] = {}
    scheduler.start()
    ids = [
        scheduler.submit(
            Request(tuple(p), 30),
            lambda e: tokens.setdefault(e.request_id, []).extend(e.tokens),
        )
        for p in prompts[:4]
    ]
    scheduler.shutdown(drain=True, timeout=60)
    assert [tokens[i] for i in ids] == want


def test_batch_decoder_rows_can_hold_different_trees(model, heads, prompts):
    """Per-row lookup branches give rows different trees in one forward ([B, N, N] mask)."""
    engine = build_engine(model, heads, "cpu_16", lookup=8)
    cache = model.new_row_cache(2, 512)
    decoder = BatchDecoder(engine, cache)
    repeat = prompts[0] * 3  # a prompt whose text repeats: the lookup branch finds matches
    rows = [RowState(SamplingConfig(), torch.Generator()) for _ in range(2)]
    for r, p in enumerate([repeat, prompts[1]]):
        decoder.prefill(r, rows[r], p, final=True)
    out = [[rs.state.root] for rs in rows]
    for _ in range(30):
        for o, e in zip(out, decoder.step(range(2), rows)):
            o.extend(e)
    for o, p in zip(out, [repeat, prompts[1]]):
        assert o[:30] == _batch1(engine, p, 30)


def test_recurrent_heads_draft_all_rows_at_once_as_each_row_alone(model, prompts):
    """`draft_rows` (one batched transition per depth for every row) equals per-row `draft`,
    and the scheduler's rows still equal their batch-1 output with it."""
    from medusa_engine.drafters import RecurrentDrafter
    from medusa_engine.tree import tree_from_name

    heads = random_recurrent(model, num_heads=3, draft_vocab=200, seed=2)
    drafter = RecurrentDrafter(heads, model, int8=False)
    tree = tree_from_name("cpu_16", 3)
    torch.manual_seed(0)
    hidden_BE = torch.randn(4, model.hidden_size)
    roots_B = torch.tensor([5, 17, 33, 2])
    rows = drafter.draft_rows(hidden_BE, roots_B, tree)
    for b in range(4):
        assert torch.equal(rows[b], drafter.draft(hidden_BE[b], roots_B[b], tree, []))
    engine = build_engine(model, heads, "cpu_16", lookup=4)
    want = [_batch1(engine, p, 40) for p in prompts[:5]]
    got = generate_all(Scheduler(engine, max_batch=4), [Request(tuple(p), 40) for p in prompts[:5]])
    assert [tokens for tokens, _ in got] == want


def test_batch_plans_are_measured_saved_loaded_and_switched_by_batch_size(
    model, heads, prompts, tmp_path
):
    from medusa_engine.batch_plans import load_plans, save_plans, tune_plans

    engine = build_engine(model, heads, "cpu_16", lookup=4)
    candidates = [("plain", 0), ("cpu_8", 4), ("cpu_16", 0)]
    chosen, measured = tune_plans(engine, prompts[:3], [1, 2], candidates, max_new_tokens=8)
    assert engine.tree.num_nodes == 15 and engine.lookup == 4  # given back as it was
    assert set(chosen) == {1, 2} and all(c in candidates for c in chosen.values())
    assert all(len(measured[b]) == 3 and min(measured[b].values()) > 0 for b in (1, 2))
    path = tmp_path / "plans.json"
    save_plans(path, {1: ("cpu_16", 4), 3: ("plain", 0)}, measured)
    plans, specs = load_plans(path, engine.drafter)
    assert plans[1].tree.num_nodes == engine.tree.num_nodes and plans[1].lookup == 4
    assert plans[3].tree.num_nodes == 1 and specs[3] == {"tree": "plain", "lookup": 0}
    # A batch of three or more verifies plain, fewer rows cpu_16: the same tokens.
    want = [_batch1(engine, p, 30) for p in prompts[:5]]
    scheduler = Scheduler(engine, max_batch=4, plans=plans)
    got = generate_all(scheduler, [Request(tuple(p), 30) for p in prompts[:5]])
    assert [tokens for tokens, _ in got] == want
    path.write_text('{"plans": {"2": {"tree": "plain", "lookup": 0}}}')
    with pytest.raises(ValueError, match="batch size 1"):
        load_plans(path, engine.drafter)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a tune-tree"):
        load_plans(path, engine.drafter)
    with pytest.raises(ValueError, match="no such file"):
        load_plans(tmp_path / "missing.json", engine.drafter)


def test_tune_tree_batch_sizes_cli_writes_plans_and_refuses_bad_sizes(tmp_path, capsys):
    from medusa_engine.batch_plans import load_plans
    from medusa_engine.cli import main

    out = tmp_path / "plans.json"
    argv = ["tune-tree", "--model", "stories260k", "--dtype", "fp32", "--out", str(out)]
    assert main([*argv, "--batch-sizes", "2,4"]) == 2
    assert "must include 1" in capsys.readouterr().err
    assert main([*argv, "--batch-sizes", "1,x"]) == 2
    assert main([*argv, "--batch-sizes", "1,2", "--calibration-tokens", "4"]) == 0
    plans, _ = load_plans(out, _bundled_drafter())
    assert set(plans) == {1, 2}


def _bundled_drafter():
    from medusa_engine.drafters import make_drafter
    from medusa_engine.heads_io import load_heads
    from medusa_engine.models import resolve_model

    source = resolve_model("stories260k")
    model = HFModel.load("stories260k", dtype="fp32", attention="sdpa")
    return make_drafter(load_heads(source.bundled_heads), model)


def test_a_drafter_with_its_own_cache_is_refused_with_a_clear_error(model):
    class CachedDrafter:
        num_heads = 1
        draft_vocab_size = model.vocab_size
        max_depth = 1

        def on_commit(self, token_ids, past, nodes):  # a per-session draft cache (EAGLE-3)
            pass

    engine = build_engine(model, None, "plain")
    engine.drafter = CachedDrafter()
    with pytest.raises(ValueError, match="eagle3"):
        Scheduler(engine)
