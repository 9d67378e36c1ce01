"""Benchmark metrics: pure functions over per-prompt run records (no timing, no I/O).

Definitions (every aggregate is over one method's runs on one set of prompts):

* tokens/s = sum(new tokens) / sum(wall time): long answers weigh more, as in Spec-Bench.
* speedup of method m = tokens/s of m / tokens/s of the baseline (`hf`) on the same prompts, i.e.
  total-tokens/total-time ratio; for greedy methods with no mismatch the token counts are equal,
  so this is sum(baseline time) / sum(m time).
* `accept_lengths[s]`: tokens emitted by verification forward s (accepted candidates + the bonus
  token; untruncated by the token budget for the engine). τ = sum of all accept lengths / number of
  steps over all runs (a token-weighted mean, not a mean of per-prompt means). None where a method
  does not expose its steps.
* acceptance rate at depth d (d = 1..D): fraction of steps whose accept length is > d, i.e. that
  kept the depth-d candidate (proposed by head d). Non-increasing in d.
* TTFT = mean over prompts of the time from the call to its first new token (includes prefill).
* TPOT = sum(wall - TTFT) / sum(new tokens - 1) over prompts with >= 2 new tokens.
* peak memory = the largest per-prompt peak (bytes above what was in use before the call).
* greedy mismatch: a prompt whose tokens differ from the baseline's in any position or in length;
  reported per prompt with the first differing position, never averaged away.
* agreeing prompts: those on which every greedy method's tokens equal the baseline's. In bf16 the
  methods' texts drift apart (a different batch shape rounds differently), and a drifted text can
  be easier to guess (a repetition loop); the greedy methods' figures over the agreeing prompts
  compare them on the same text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptRun:
    """One method on one prompt. `index` is the prompt's position in the run (the join key)."""

    method: str
    index: int
    question_id: int | str
    category: str
    token_ids: tuple[int, ...]
    wall_s: float
    ttft_s: float
    accept_lengths: tuple[int, ...] | None  # None: the method's steps are not observable
    peak_mem_bytes: int | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


def throughput(runs: Sequence[PromptRun]) -> float:
    seconds = sum(r.wall_s for r in runs)
    return sum(r.new_tokens for r in runs) / seconds if seconds > 0 else 0.0


def speedup(runs: Sequence[PromptRun], baseline: Sequence[PromptRun]) -> float | None:
    """tokens/s ratio against `baseline` on the same prompts (None without a baseline)."""
    if not runs or not baseline:
        return None
    if sorted(r.index for r in runs) != sorted(r.index for r in baseline):
        raise ValueError("speedup needs both methods' runs on the same prompts")
    base = throughput(baseline)
    return throughput(runs) / base if base > 0 else None


def tau(runs: Sequence[PromptRun]) -> float | None:
    """Mean tokens per verification step over all steps of all runs."""
    lengths = _all_lengths(runs)
    return sum(lengths) / len(lengths) if lengths else None


def acceptance_by_depth(runs: Sequence[PromptRun], depth: int) -> list[float] | None:
    """[rate at d=1, ..., rate at d=depth]: fraction of steps with accept length > d."""
    lengths = _all_lengths(runs)
    if not lengths or depth <= 0:
        return None
    return [sum(n > d for n in lengths) / len(lengths) for d in range(1, depth + 1)]


def accept_length_histogram(runs: Sequence[PromptRun]) -> dict[int, int]:
    """{tokens emitted by a step: number of such steps}, sorted by length."""
    hist: dict[int, int] = {}
    for n in _all_lengths(runs) or []:
        hist[n] = hist.get(n, 0) + 1
    return dict(sorted(hist.items()))


def mean_ttft(runs: Sequence[PromptRun]) -> float | None:
    timed = [r.ttft_s for r in runs if r.new_tokens > 0]
    return sum(timed) / len(timed) if timed else None


def tpot(runs: Sequence[PromptRun]) -> float | None:
    decoded = [r for r in runs if r.new_tokens >= 2]
    tokens = sum(r.new_tokens - 1 for r in decoded)
    return sum(r.wall_s - r.ttft_s for r in decoded) / tokens if tokens else None


def peak_memory(runs: Sequence[PromptRun]) -> int | None:
    peaks = [r.peak_mem_bytes for r in runs if r.peak_mem_bytes is not None]
    return max(peaks) if peaks else None


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where `a` and `b` differ (a length difference counts at the
    shorter length); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_mismatches(runs: Sequence[PromptRun], reference: Sequence[PromptRun]) -> dict:
    """{"count": prompts that differ, "first_diff": {question_id: first differing position}}."""
    ref = {r.index: r for r in reference}
    first_diff: dict[str, int] = {}
    for r in runs:
        pos = first_difference(r.token_ids, ref[r.index].token_ids)
        if pos is not None:
            first_diff[str(r.question_id)] = pos
    return {"count": len(first_diff), "first_diff": first_diff}


def aggregate(runs: Sequence[PromptRun], baseline: Sequence[PromptRun] | None, depth: int) -> dict:
    """Every metric of one method on one set of prompts (seconds, bytes; None = not measured)."""
    return {
        "prompts": len(runs),
        "new_tokens": sum(r.new_tokens for r in runs),
        "wall_s": sum(r.wall_s for r in runs),
        "tokens_per_s": throughput(runs),
        "speedup": speedup(runs, baseline) if baseline else None,
        "tau": tau(runs),
        "acceptance_by_depth": acceptance_by_depth(runs, depth),
        "ttft_s": mean_ttft(runs),
        "tpot_s": tpot(runs),
        "peak_mem_bytes": peak_memory(runs),
    }


def summarize(
    runs_by_method: dict[str, list[PromptRun]],
    baseline: str = "hf",
    greedy: Iterable[str] = (),
    depth: dict[str, int] | None = None,
) -> dict[str, dict]:
    """Per method: {"all": aggregate, "categories": {category: aggregate}, "mismatches": ...}.

    `greedy`: methods to check token for token against `baseline` (mismatches is None for the
    others, and for all when the baseline did not run). `depth`: tree depth per method for the
    acceptance rates (0 or absent: none).
    """
    base = runs_by_method.get(baseline)
    greedy = set(greedy)
    out: dict[str, dict] = {}
    for method, runs in runs_by_method.items():
        d = (depth or {}).get(method, 0)
        categories = sorted({r.category for r in runs})
        out[method] = {
            "all": aggregate(runs, base, d),
            "categories": {
                c: aggregate(
                    [r for r in runs if r.category == c],
                    [r for r in base if r.category == c] if base else None,
                    d,
                )
                for c in categories
            },
            "mismatches": (
                greedy_mismatches(runs, base)
                if base is not None and method in greedy and method != baseline
                else None
            ),
        }
    return out


def agreeing(
    runs_by_method: dict[str, list[PromptRun]], baseline: str, greedy: Iterable[str]
) -> dict | None:
    """The greedy methods (baseline included) aggregated over the prompts where all of them emit
    the baseline's tokens: {"prompts": n, "of": all prompts, "results": {method: aggregate}}.
    None without a baseline or another greedy method."""
    base = runs_by_method.get(baseline)
    methods = [m for m in dict.fromkeys(greedy) if m in runs_by_method and m != baseline]
    if base is None or not methods:
        return None
    tokens = {r.index: r.token_ids for r in base}
    keep = set(tokens)
    for m in methods:
        keep -= {r.index for r in runs_by_method[m] if r.token_ids != tokens[r.index]}
    subset = {m: [r for r in runs_by_method[m] if r.index in keep] for m in [baseline, *methods]}
    return {
        "prompts": len(keep),
        "of": len(base),
        "results": {m: aggregate(runs, subset[baseline], 0) for m, runs in subset.items()},
    }


def _all_lengths(runs: Sequence[PromptRun]) -> list[int] | None:
    if not runs or any(r.accept_lengths is None for r in runs):
        return None
    return [n for r in runs for n in r.accept_lengths or ()]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-th percentile of `values` (None when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
