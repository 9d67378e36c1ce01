"""Benchmark metrics on synthetic step logs, against values computed by hand."""

from __future__ import annotations

import pytest

from eval import metrics
from eval.metrics import PromptRun


def run(method, index, category, tokens, wall, ttft, lengths, mem=None) -> PromptRun:
    return PromptRun(method, index, f"q{index}", category, tuple(tokens), wall, ttft,
                     None if lengths is None else tuple(lengths), mem)  # fmt: skip


REF0, REF1 = list(range(10)), list(range(100, 120))
HF = [
    run("hf", 0, "A", REF0, 1.0, 0.1, [1] * 10, 1000),
    run("hf", 1, "B", REF1, 3.0, 0.2, [1] * 20, 3000),
]
BAD1 = REF1[:7] + [999] + REF1[8:]  # differs at position 7
MEDUSA = [
    run("medusa", 0, "A", REF0, 0.5, 0.05, [3, 2, 1, 3], 2000),  # 1 (prefill) + 9 = 10 tokens
    run("medusa", 1, "B", BAD1, 1.0, 0.1, [1, 4, 2, 2, 3, 3, 4], 500),  # 1 + 19 = 20
]
PLD = [
    run("hf-pld", 0, "A", REF0, 0.8, 0.1, None),
    run("hf-pld", 1, "B", REF1[:15], 2.0, 0.1, None),  # stops early: a length mismatch at 15
]


def test_throughput_and_speedup_are_total_tokens_over_total_time():
    assert metrics.throughput(HF) == pytest.approx(30 / 4.0)
    assert metrics.throughput(MEDUSA) == pytest.approx(30 / 1.5)
    assert metrics.speedup(MEDUSA, HF) == pytest.approx(20 / 7.5)
    # Not the mean of per-prompt ratios (2.0 and 3.0 -> 2.5).
    assert metrics.speedup(MEDUSA, HF) != pytest.approx(2.5)
    with pytest.raises(ValueError, match="same prompts"):
        metrics.speedup(MEDUSA[:1], HF)


def test_tau_is_token_weighted_over_all_steps():
    assert metrics.tau(MEDUSA) == pytest.approx(28 / 11)  # not (9/4 + 19/7) / 2
    assert metrics.tau(HF) == 1.0
    assert metrics.tau(PLD) is None  # steps not observed: never made up
    assert metrics.tau([]) is None


def test_acceptance_by_depth_counts_steps_longer_than_d():
    # lengths 3,2,1,3,1,4,2,2,3,3,4: >1: 9, >2: 6, >3: 2, >4: 0 of 11 steps
    rates = metrics.acceptance_by_depth(MEDUSA, 4)
    assert rates == pytest.approx([9 / 11, 6 / 11, 2 / 11, 0.0])
    assert rates == sorted(rates, reverse=True)
    assert metrics.acceptance_by_depth(HF, 2) == [0.0, 0.0]
    assert metrics.acceptance_by_depth(PLD, 2) is None
    assert metrics.accept_length_histogram(MEDUSA) == {1: 2, 2: 3, 3: 4, 4: 2}


def test_latency_and_memory():
    assert metrics.mean_ttft(MEDUSA) == pytest.approx(0.075)
    assert metrics.tpot(MEDUSA) == pytest.approx((0.45 + 0.9) / (9 + 19))
    assert metrics.peak_memory(MEDUSA) == 2000
    assert metrics.peak_memory(PLD) is None
    one = [run("m", 0, "A", [5], 0.2, 0.2, [])]
    assert metrics.tpot(one) is None


def test_first_difference_and_mismatch_detection():
    assert metrics.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert metrics.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert metrics.first_difference([1, 2, 3], [1, 2]) == 2  # length difference
    assert metrics.first_difference([], [4]) == 0
    assert metrics.greedy_mismatches(MEDUSA, HF) == {"count": 1, "first_diff": {"q1": 7}}
    assert metrics.greedy_mismatches(PLD, HF) == {"count": 1, "first_diff": {"q1": 15}}
    assert metrics.greedy_mismatches(HF, HF) == {"count": 0, "first_diff": {}}


def test_summarize_per_method_and_category():
    typical = [
        run("medusa-typical", i, c, [7] * 5, 0.25, 0.05, [2, 2]) for i, c in [(0, "A"), (1, "B")]
    ]
    s = metrics.summarize(
        {"hf": HF, "hf-pld": PLD, "medusa": MEDUSA, "medusa-typical": typical},
        baseline="hf",
        greedy=["hf", "hf-pld", "medusa"],
        depth={"medusa": 4, "medusa-typical": 4},
    )
    med = s["medusa"]
    assert med["all"]["speedup"] == pytest.approx(20 / 7.5)
    assert med["all"]["new_tokens"] == 30 and med["all"]["prompts"] == 2
    a, b = med["categories"]["A"], med["categories"]["B"]
    assert a["speedup"] == pytest.approx((10 / 0.5) / (10 / 1.0))  # 2.0
    assert b["speedup"] == pytest.approx((20 / 1.0) / (20 / 3.0))  # 3.0
    assert a["tau"] == pytest.approx(9 / 4) and b["tau"] == pytest.approx(19 / 7)
    assert a["acceptance_by_depth"] == pytest.approx([3 / 4, 2 / 4, 0, 0])
    assert med["mismatches"] == {"count": 1, "first_diff": {"q1": 7}}
    assert s["hf"]["all"]["speedup"] == 1.0 and s["hf"]["mismatches"] is None
    assert s["hf-pld"]["all"]["tau"] is None and s["hf-pld"]["mismatches"]["count"] == 1
    # Sampling: not checked against greedy; speedup counts its own tokens (10 in 0.5 s vs 7.5/s).
    assert s["medusa-typical"]["mismatches"] is None
    assert s["medusa-typical"]["all"]["speedup"] == pytest.approx(20 / 7.5)
    assert s["medusa-typical"]["all"]["tau"] == 2.0
    assert s["hf"]["all"]["acceptance_by_depth"] is None  # no depth given for hf


def test_summarize_without_baseline_reports_none():
    s = metrics.summarize({"medusa": MEDUSA}, baseline="hf", greedy=["medusa"])
    assert s["medusa"]["all"]["speedup"] is None
    assert s["medusa"]["mismatches"] is None
    assert s["medusa"]["all"]["tokens_per_s"] == pytest.approx(20.0)


def test_agreeing_prompts_compare_greedy_methods_on_the_same_text():
    # q1 differs for medusa (position 7) and hf-pld (length): only prompt 0 agrees everywhere.
    agree = metrics.agreeing(
        {"hf": HF, "hf-pld": PLD, "medusa": MEDUSA},
        baseline="hf",
        greedy=["hf", "hf-pld", "medusa"],
    )
    assert agree is not None and (agree["prompts"], agree["of"]) == (1, 2)
    res = agree["results"]
    assert list(res) == ["hf", "hf-pld", "medusa"]
    assert res["medusa"]["speedup"] == pytest.approx((10 / 0.5) / (10 / 1.0))
    assert res["hf-pld"]["speedup"] == pytest.approx((10 / 0.8) / (10 / 1.0))
    assert res["medusa"]["tau"] == pytest.approx(9 / 4) and res["hf"]["new_tokens"] == 10
    # One method alone keeps its own agreeing prompts; none without a baseline or another method.
    alone = metrics.agreeing({"hf": HF, "medusa": HF}, baseline="hf", greedy=["medusa"])
    assert alone is not None and alone["prompts"] == 2
    assert metrics.agreeing({"medusa": MEDUSA}, baseline="hf", greedy=["medusa"]) is None
    assert metrics.agreeing({"hf": HF}, baseline="hf", greedy=["hf"]) is None
