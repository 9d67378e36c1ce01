"""The `bench` harness: prompt loading, timing helpers, and one end-to-end run on stories260k."""

from __future__ import annotations

import json

import pytest
import torch

from eval import harness
from eval.prompts import PromptsError, load_prompts, take_round_robin
from eval.timing import (
    REPO,
    CallTimer,
    HFStepClock,
    PeakMemory,
    environment,
    heads_label,
    time_calls,
)
from tests.helpers import random_heads

STORIES = ["Once upon a time", "Tom had a red ball", "The cat was very hungry"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_file_fields_and_defaults(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": 7, "category": "story", "turns": ["first turn", "second turn"]},
        {"id": "x", "prompt": "a prompt"},
        {"text": "a text"},
    ])  # fmt: skip
    prompts = load_prompts(str(path))
    assert [(p.question_id, p.category, p.text) for p in prompts] == [
        (7, "story", "first turn"), ("x", "default", "a prompt"), (2, "default", "a text"),
    ]  # fmt: skip
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "answer": "no text"}])
    with pytest.raises(PromptsError, match="no `turns`, `prompt` or `text`"):
        load_prompts(str(bad))
    with pytest.raises(PromptsError, match="no prompt set or file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_bundled_sets_and_round_robin_limit():
    mt = load_prompts("mt_bench")
    assert len(mt) == 80 and len({p.category for p in mt}) == 8
    assert mt[0].text.startswith("Compose an engaging travel blog post")
    spec = load_prompts("spec_bench")
    assert len(spec) == 480
    assert {p.category for p in spec} == {
        "mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag",
    }  # fmt: skip
    six = load_prompts("spec_bench", limit=6)
    assert len({p.category for p in six}) == 6  # one per category, not the first 6 rows
    assert [p.question_id for p in take_round_robin(mt, 9)][-1] == mt[1].question_id
    assert load_prompts("mt_bench", limit=3) == [mt[0], mt[10], mt[20]]


def test_step_clock_sees_one_put_per_forward(stories260k, one_thread):
    """hf-pld's τ = tokens per base-model forward: the streamer's puts match the forwards."""
    ids = stories260k.tokenizer("Once upon a time there was a girl. Once upon a time")["input_ids"]
    forwards = []
    hook = stories260k.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        for extra in ({}, {"prompt_lookup_num_tokens": 10}):
            forwards.clear()
            clock = HFStepClock(0.0)
            out = stories260k.model.generate(
                torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0,
                streamer=clock, **extra,
            )  # fmt: skip
            new = out.shape[1] - len(ids)
            assert len(clock.step_tokens) == len(forwards)
            assert sum(clock.step_tokens) == new
            assert clock.ttft_s is not None and clock.ttft_s > 0
    finally:
        hook.remove()


def test_peak_memory_sees_a_fresh_allocation():
    with PeakMemory("cpu") as mem:
        block = torch.ones(16 << 20, dtype=torch.float32)  # 64 MiB, freshly mapped
        del block
    assert mem.peak_bytes is not None
    if mem.source == "vmhwm":
        assert mem.peak_bytes >= 60 << 20, mem.peak_bytes


def test_time_calls_warms_up_runs_before_each_call_and_times_the_rest():
    calls = {"fn": 0, "before": 0}

    def fn() -> None:
        calls["fn"] += 1

    def before() -> None:
        calls["before"] += 1

    for clock in ("wall", "events"):  # events: the host clock off CUDA
        seconds = time_calls(fn, "cpu", iters=3, warmup=2, before=before, clock=clock)
        assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert calls == {"fn": 10, "before": 10}
    with pytest.raises(ValueError, match="unknown clock"):
        time_calls(fn, "cpu", iters=1, clock="sundial")
    timer = CallTimer()
    assert timer.wrap(lambda x: x + 1)(1) == 2 and timer.calls == 1 and timer.seconds >= 0


def test_stamps_name_no_folder_of_the_machine(tmp_path):
    assert heads_label("auto", "stories260k") == "bundled:stories260k"
    bundled = REPO / "medusa_engine" / "assets" / "heads" / "stories260k"
    assert heads_label(str(bundled), "stories260k") == "medusa_engine/assets/heads/stories260k"
    assert heads_label("none", "stories260k") == "none"
    assert not heads_label(str(tmp_path / "heads"), "stories260k").startswith("/")
    stamp = environment("cpu", torch.float32, load_start=0.5)
    assert stamp["dtype"] == "float32" and stamp["load_avg_1m"][0] == 0.5
    assert stamp["torch"] == torch.__version__ and stamp["threads"] == torch.get_num_threads()
    assert {"device_name", "transformers", "git_commit", "git_dirty", "time_utc"} <= set(stamp)
    assert not any(isinstance(v, str) and v.startswith("/") for v in stamp.values()), stamp


def test_bad_flags_end_in_one_line_errors(capsys, tmp_path):
    code = harness.main(["--prompts", "mt_bench", "--methods", "hf,nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("medusa-engine: error: unknown method")
        and err.count("\n") == 1
    )
    code = harness.main(["--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)])
    assert code == 2 and "no prompt set or file" in capsys.readouterr().err
    code = harness.main(["--prompts", "mt_bench", "--tree-sweep", "cpu_8,big", "--out", "x"])
    assert code == 2 and "--tree-sweep: unknown tree" in capsys.readouterr().err


def test_bench_end_to_end_on_stories260k(capsys, tmp_path):
    random_heads(save_to=tmp_path / "heads")
    prompts = write_jsonl(tmp_path / "stories.jsonl", [
        {"question_id": i, "category": "story" if i < 2 else "other", "prompt": t}
        for i, t in enumerate(STORIES)
    ])  # fmt: skip
    out = tmp_path / "out"
    code = harness.main([
        "--model", "stories260k", "--heads", str(tmp_path / "heads"), "--dtype", "fp32",
        "--prompts", str(prompts), "--max-new-tokens", "16", "--tree-sweep", "cpu_8,cpu_16",
        "--methods", "hf,hf-pld,medusa,hf-sample,medusa-typical,medusa-lossless", "--out", str(out), "--threads", "1",
        "--lookup", "0",
    ])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    line = json.loads(stdout.strip().splitlines()[-1])
    methods = [
        "hf",
        "hf-pld",
        "medusa",
        "hf-sample",
        "medusa-typical",
        "medusa-lossless",
        "medusa@cpu_8",
    ]
    expected = {f"{m}.jsonl" for m in methods} | {"summary.json", "summary.md"}
    expected |= {"speedup_by_category.png", "accept_lengths.png", "tree_sweep.png"}
    assert expected <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    res = summary["results"]
    assert res["medusa"]["mismatches"] == {"count": 0, "first_diff": {}}
    assert line["methods"]["medusa"]["greedy_mismatches"] == 0
    assert res["medusa@cpu_8"]["mismatches"]["count"] == 0
    assert res["medusa-typical"]["mismatches"] is None
    assert res["medusa-lossless"]["mismatches"] is None and res["hf-sample"]["mismatches"] is None
    agree = summary["agreeing"]  # the greedy methods only (sampling has no text to agree on)
    assert set(agree["results"]) == {"hf", "hf-pld", "medusa", "medusa@cpu_8"} and agree["of"] == 3
    assert agree["prompts"] == 3 - len(res["hf-pld"]["mismatches"]["first_diff"])
    assert res["hf"]["all"]["tau"] == 1.0 and res["hf"]["all"]["speedup"] == 1.0
    assert (
        res["medusa"]["all"]["tau"] >= 1.0 and len(res["medusa"]["all"]["acceptance_by_depth"]) == 4
    )
    assert set(res["medusa"]["categories"]) == {"story", "other"}
    assert [r["tree"] for r in summary["tree_sweep"]] == ["cpu_8", "cpu_16"]
    assert summary["tree_sweep"][1]["method"] == "medusa"  # --tree cpu_16 is reused
    stamp = summary["stamp"]
    assert stamp["dtype"] == "float32" and stamp["trees"]["medusa"] == {
        "name": "cpu_16", "nodes": 17, "depth": 4,
    }  # fmt: skip
    assert stamp["torch"] == torch.__version__ and stamp["transformers"]
    assert not stamp["heads"].startswith("/")  # relative to the repository root
    answers = [json.loads(x) for x in (out / "medusa.jsonl").read_text().splitlines()]
    hf = [json.loads(x) for x in (out / "hf.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [0, 1, 2]
    for a, h in zip(answers, hf):
        choice = a["choices"][0]
        assert a["model_id"] == "medusa" and choice["turns"] == h["choices"][0]["turns"]
        assert choice["new_tokens"] == [16] and choice["wall_time"][0] > 0
        assert h["choices"][0]["accept_lengths"] == [1] * 16
        assert sum(choice["accept_lengths"]) >= 15  # the prefill's token is not a step
    md = (out / "summary.md").read_text()
    assert "| medusa |" in md and "tree_sweep.png" in md


def test_compare_heads_runs_a_second_drafter_in_the_same_run(tmp_path, capsys):
    """`--compare-heads`: the bundled EAGLE-3 drafter beside random recurrent heads, both greedy
    and lossless, both on the tree sweep, one table."""
    random_heads(save_to=tmp_path / "heads")
    prompts = write_jsonl(tmp_path / "stories.jsonl", [
        {"question_id": i, "category": "story", "prompt": t} for i, t in enumerate(STORIES[:2])
    ])  # fmt: skip
    out, eagle3 = tmp_path / "out", "medusa_engine/assets/heads/stories260k-eagle3"
    code = harness.main([
        "--model", "stories260k", "--heads", str(tmp_path / "heads"), "--dtype", "fp32",
        "--prompts", str(prompts), "--max-new-tokens", "16", "--tree", "cpu_8",
        "--tree-sweep", "cpu_8,dynamic:8", "--methods", "hf,medusa", "--out", str(out),
        "--threads", "1", "--lookup", "0", "--compare-heads", eagle3,
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    res = summary["results"]
    assert list(res) == [
        "hf", "medusa", "medusa@dynamic:8", "medusa+stories260k-eagle3",
        "medusa+stories260k-eagle3@dynamic:8",
    ]  # fmt: skip
    assert all(r["mismatches"]["count"] == 0 for m, r in res.items() if m != "hf")
    assert res["medusa+stories260k-eagle3"]["all"]["tau"] > res["medusa"]["all"]["tau"]
    sweep = {(r["heads"], r["tree"]): r["method"] for r in summary["tree_sweep"]}
    assert sweep[(eagle3, "cpu_8")] == "medusa+stories260k-eagle3"
    assert sweep[(eagle3, "dynamic:8")] == "medusa+stories260k-eagle3@dynamic:8" and len(sweep) == 4
    assert f"| {eagle3} | dynamic:8 |" in (out / "summary.md").read_text()


def test_compare_heads_that_cannot_load_are_a_one_line_error(tmp_path, capsys):
    for folder in (tmp_path / "missing", "medusa_engine/assets/heads/smollm2-135m-instruct"):
        code = harness.main([
            "--model", "stories260k", "--heads", "none", "--prompts", "mt_bench", "--limit", "1",
            "--methods", "medusa", "--out", str(tmp_path / "out"), "--compare-heads", str(folder),
        ])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "--compare-heads" in err and err.count("\n") == 1, err


def test_step_benchmark_smoke_on_cpu(capsys):
    from eval import bench_step

    code = bench_step.main(["--preset", "tiny", "--dtype", "fp32", "--device", "cpu", "--prefix",
                            "32", "--sizes", "1,16", "--repeats", "2",
                            "--methods", "hf-eager,engine-sdpa"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert code == 0 and summary["benchmark"] == "step_latency"
    for method in ("hf-eager", "engine-sdpa"):
        row = summary["ms_per_step"][method]
        assert "error" not in row and all(row[s] > 0 for s in ("1", "16")), row


def test_draft_cost_benchmark_times_each_depth_and_the_capture(capsys):
    from eval import bench_draft

    eagle3 = "medusa_engine/assets/heads/stories260k-eagle3"
    code = bench_draft.main([
        "--model", "stories260k", "--dtype", "fp32", "--heads", eagle3, "--heads",
        "medusa_engine/assets/heads/stories260k", "--tree", "dynamic:8:4:4:3", "--limit", "2",
        "--max-new-tokens", "12", "--threads", "1", "--capture-tokens", "8",
        "--capture-repeats", "2",
    ])  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["benchmark"] == "draft_cost"
    row = summary["engines"]["stories260k-eagle3"]
    assert row["greedy_mismatches_vs_first"] == 0 and row["heads"] == eagle3
    assert list(row["draft_ms_per_depth"]) == ["1", "2", "3"]
    assert 0 < row["draft_ms_per_step"] < row["ms_per_step"] and 0 < row["draft_share"] < 1
    assert summary["engines"]["stories260k"]["greedy_mismatches_vs_first"] == 0
    capture = summary["aux_capture"]
    assert capture["ms_without_hooks"] > 0 and capture["ms_with_hooks"] > 0


@pytest.mark.slow
def test_hf_static_baseline_survives_many_calls_on_cpu(capsys):
    """transformers' static cache appends on every call; the baseline rewinds it, so many timed
    calls at 4 tokens stay inside a 4 + 8 slot margin (they overflowed it before)."""
    from eval import bench_step

    code = bench_step.main(["--preset", "tiny", "--dtype", "fp32", "--device", "cpu", "--prefix",
                            "32", "--sizes", "1,4", "--repeats", "12",
                            "--methods", "hf-static-compiled"])  # fmt: skip
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ms_per_step"]
    assert code == 0 and all(row["hf-static-compiled"][s] > 0 for s in ("1", "4")), row


def test_drafter_fit_scores_training_and_held_out_examples(tmp_path, capsys):
    from eval import drafter_fit
    from tests.test_recurrent_heads import STORIES

    data = tmp_path / "stories.txt"
    data.write_text("<|endoftext|>".join(STORIES.read_text("utf-8").split("<|endoftext|>")[:10]))
    flags = ["--model", "stories260k", "--data", str(data), "--max-length", "48",
             "--precision", "fp32", "--eval-fraction", "0.2", "--batch-size", "4"]  # fmt: skip
    eagle3 = "medusa_engine/assets/heads/stories260k-eagle3"
    code = drafter_fit.main(
        ["--heads", eagle3, "--train-sample", "3", "--", *flags, "--kind", "eagle3"]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["kind"] == "eagle3"
    assert list(summary["top1"]) == ["train (first 3)", "held-out (2)"]
    for top1 in summary["top1"].values():
        assert len(top1) == 4 and all(0 <= a <= 1 for a in top1) and top1[0] > 0, top1
    with pytest.raises(SystemExit):  # a medusa drafter scored as eagle3: refused
        drafter_fit.main(["--heads", "medusa_engine/assets/heads/stories260k", "--", *flags,
                          "--kind", "eagle3"])  # fmt: skip
    assert "is a medusa drafter; the flags say --kind eagle3" in capsys.readouterr().err
