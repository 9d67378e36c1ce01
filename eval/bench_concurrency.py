"""`medusa-engine bench --concurrency 1,2,4,8`: continuous batching against its baselines.

    medusa-engine bench --prompts mt_bench --limit 32 --concurrency 1,2,4,8 --dtype bf16 --out DIR

For each concurrency C, N prompts run with C requests in flight (closed loop: C clients, each
sending its next prompt when its previous answer ends; or, with `--arrival-rate R`, Poisson
arrivals at R requests/s), through the scheduler (`medusa_engine.scheduler`) with at most C rows.
Baselines, same process, same prompts, same token budget, greedy:

* `engine-seq`: our batch-1 engine (`MedusaGenerator.generate`, today's single-request path),
  one prompt after another;
* `hf-batch@C`: HF `generate` on the prompts in batches of C, left-padded (a batch ends when its
  longest answer does, as static batching does).

Figures: aggregate tokens/s (all new tokens / wall time from the first submission to the last
answer), per-request TTFT (submission to first token, queueing included) and TPOT ((end - first
token) / (tokens - 1)) at p50 / p99, τ, the scheduler's peak KV allocation and the process's
peak RSS. Greedy answers are compared with `engine-seq`'s and `hf-batch@C`'s token for token
(bf16 rounding differs with the batch shape, so rows may drift apart there; fp32 rows are
identical, see tests/test_batch.py). Writes summary.json and throughput.png to `--out`; prints
a table, then one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from eval.metrics import percentile
from eval.timing import environment
from medusa_engine.batch_plans import parse_sizes, plans_for
from medusa_engine.config import SamplingConfig
from medusa_engine.engine import load_engine
from medusa_engine.scheduler import Event, Request, Scheduler


@dataclass
class RequestRecord:
    submit_s: float = 0.0
    first_s: float | None = None
    end_s: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return (self.first_s if self.first_s is not None else self.end_s) - self.submit_s

    @property
    def tpot(self) -> float | None:
        if self.first_s is None or len(self.tokens) < 2:
            return None
        return (self.end_s - self.first_s) / (len(self.tokens) - 1)


def run(args: Any, prompts: list, progress) -> dict:
    """The whole benchmark (see the module docstring); returns the summary."""
    from medusa_engine.hf_adapter import encode_prompt

    levels = parse_sizes(args.concurrency, "--concurrency")
    from medusa_engine.cli import engine_config

    config = replace(engine_config(args), sampling=SamplingConfig())
    seq_engine = load_engine(config, progress)  # today's single-request path, as configured
    engine = seq_engine
    if config.attention == "hf":  # batched verification runs on our attention: a second copy
        engine = load_engine(replace(config, attention="sdpa"), progress)
    model = engine.model
    encoded = [encode_prompt(model.tokenizer, p.text, args.raw) for p in prompts]
    plans = plans_for(config, engine.drafter, args.batch_plans)
    load_start = os.getloadavg()
    n_new = args.max_new_tokens
    methods: dict[str, dict] = {}

    seq_engine.generate(encoded[0][:16], 8)  # warm-up
    progress(f"engine-seq: our batch-1 engine (attention {config.attention}), one by one")
    seq = _sequential(seq_engine, encoded, n_new)
    methods["engine-seq"] = _figures(seq, None)
    answers: dict[int, list[list[int]]] = {}
    for c in levels:
        progress(f"scheduler at concurrency {c}")
        scheduler = Scheduler(engine, max_batch=c, plans=plans, max_queue=len(encoded))
        _closed_loop(scheduler, [p[:16] for p in encoded[:c]], 8, c, None)  # warm-up
        records = _closed_loop(scheduler, encoded, n_new, c, args.arrival_rate)
        stats = scheduler.stats()
        answers[c] = [r.tokens for r in records]
        methods[f"sched@{c}"] = _figures(records, stats) | {
            "same_as_engine_seq": sum(r.tokens == s.tokens for r, s in zip(records, seq)),
        }
    hf_model = seq_engine.model
    if config.attention != "hf":
        hf_model.restore()  # type: ignore[attr-defined]  # HF's own attention for its baseline
    for c in levels:
        progress(f"hf generate, batches of {c}")
        hf = _hf_batches(hf_model, encoded, n_new, c)
        methods[f"hf-batch@{c}"] = _figures(hf, None)
        same = sum(r.tokens == a for r, a in zip(hf, answers[c]))
        methods[f"sched@{c}"]["same_as_hf_batch"] = same
    base = methods["engine-seq"]["tokens_per_s"]
    for c in levels:
        s = methods[f"sched@{c}"]
        s["x_engine_seq"] = round(s["tokens_per_s"] / base, 3)
        s["x_hf_batch"] = round(s["tokens_per_s"] / methods[f"hf-batch@{c}"]["tokens_per_s"], 3)
    stamp = environment(model.device, model.dtype, load_start[0])
    warnings = []
    if model.device.type == "cpu" and max(stamp["load_avg_1m"]) > (stamp["cpu_count"] or 1):
        warnings.append(f"1-min load average {stamp['load_avg_1m']} exceeds the CPUs")
    return {
        "benchmark": "medusa_concurrency",
        "prompts": args.prompts,
        "num_prompts": len(encoded),
        "max_new_tokens": n_new,
        "levels": levels,
        "arrival_rate": args.arrival_rate,
        "plans": plans_label(plans),
        "engine_seq_attention": config.attention,
        "stamp": stamp | {"model": args.model, "peak_rss_bytes": _peak_rss()},
        "warnings": warnings,
        "methods": methods,
    }


def plans_label(plans) -> dict | None:
    if plans is None:
        return None
    return {b: {"nodes": p.tree.num_nodes, "lookup": p.lookup} for b, p in sorted(plans.items())}


def _sequential(engine, encoded: list[list[int]], n_new: int) -> list[RequestRecord]:
    records = []
    clock = time.perf_counter()
    for ids in encoded:
        rec = RequestRecord(submit_s=time.perf_counter() - clock)
        for chunk in engine.stream(ids, n_new):
            if rec.first_s is None:
                rec.first_s = time.perf_counter() - clock
            rec.tokens.extend(chunk)
        rec.end_s = time.perf_counter() - clock
        records.append(rec)
    return records


def _closed_loop(
    scheduler: Scheduler, encoded: list[list[int]], n_new: int, c: int, rate: float | None
) -> list[RequestRecord]:
    """Run every prompt through `scheduler` with `c` in flight (or Poisson arrivals at `rate`
    requests/s); the scheduler is stepped on this thread."""
    records = [RequestRecord() for _ in encoded]
    owner: dict[int, int] = {}
    pending = list(range(len(encoded)))
    clock = time.perf_counter()
    done = 0

    def submit(i: int) -> None:
        records[i].submit_s = time.perf_counter() - clock
        owner[scheduler.submit(Request(tuple(encoded[i]), n_new), on_event)] = i

    def on_event(event: Event) -> None:
        nonlocal done
        rec = records[owner[event.request_id]]
        now = time.perf_counter() - clock
        if event.tokens and rec.first_s is None:
            rec.first_s = now
        rec.tokens.extend(event.tokens)
        if event.finish_reason is not None:
            rec.end_s = now
            done += 1
            if rate is None and pending:
                submit(pending.pop(0))

    if rate is None:
        for _ in range(min(c, len(pending))):
            submit(pending.pop(0))
        scheduler.run_until_idle()
        return records
    rng = random.Random(0)
    arrivals, t = [], 0.0
    for _ in encoded:
        t += rng.expovariate(rate)
        arrivals.append(t)
    while done < len(encoded):
        now = time.perf_counter() - clock
        while pending and arrivals[pending[0]] <= now:
            submit(pending.pop(0))
        if not scheduler.step() and pending:
            time.sleep(max(0.0, arrivals[pending[0]] - (time.perf_counter() - clock)))
    return records


@torch.inference_mode()
def _hf_batches(model, encoded: list[list[int]], n_new: int, c: int) -> list[RequestRecord]:
    """HF `generate`, greedy, on batches of `c` left-padded prompts."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.eos_token_ids[0]
    eos = set(model.eos_token_ids)
    records = []
    clock = time.perf_counter()
    model.model.generate(torch.tensor([encoded[0][:16]]), max_new_tokens=4, pad_token_id=pad)
    for start in range(0, len(encoded), c):
        group = encoded[start : start + c]
        width = max(len(ids) for ids in group)
        ids_BT = torch.tensor([[pad] * (width - len(ids)) + ids for ids in group])
        mask_BT = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in group])
        submit = time.perf_counter() - clock
        out = model.model.generate(
            ids_BT, attention_mask=mask_BT, max_new_tokens=n_new, do_sample=False,
            pad_token_id=pad,
        )  # fmt: skip
        end = time.perf_counter() - clock
        for row in out[:, width:].tolist():
            tokens = []
            for t in row:
                tokens.append(t)
                if t in eos:
                    break
            records.append(RequestRecord(submit, None, end, tokens))
    return records


def _figures(records: list[RequestRecord], stats) -> dict:
    tokens = sum(len(r.tokens) for r in records)
    span = max(r.end_s for r in records) - min(r.submit_s for r in records)
    # HF batches stream nothing: their requests have no first-token time, only an end.
    ttft = [r.ttft for r in records if r.first_s is not None]
    tpot = [t for r in records if (t := r.tpot) is not None]
    out = {
        "tokens": tokens,
        "wall_s": round(span, 3),
        "tokens_per_s": round(tokens / span, 2),
        "ttft_p50_s": _round(percentile(ttft, 50)),
        "ttft_p99_s": _round(percentile(ttft, 99)),
        "tpot_p50_s": _round(percentile(tpot, 50)),
        "tpot_p99_s": _round(percentile(tpot, 99)),
    }
    if stats is not None:
        out |= {
            "tau": round(stats.accepted_total / max(stats.row_steps_total, 1), 3),
            "mean_batch": round(stats.row_steps_total / max(stats.steps_total, 1), 2),
            "kv_peak_bytes": stats.kv_bytes_peak,
            "kv_budget_bytes": stats.kv_budget_bytes,
        }
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def table(summary: dict) -> str:
    rows = [f"{'method':<14}{'tok/s':>9}{'x seq':>7}{'x hf':>7}{'tau':>7}{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>8}"]  # fmt: skip
    for label, m in summary["methods"].items():
        rows.append(
            f"{label:<14}{m['tokens_per_s']:>9.1f}{m.get('x_engine_seq', float('nan')):>7.2f}"
            f"{m.get('x_hf_batch', float('nan')):>7.2f}{m.get('tau', float('nan')):>7.2f}"
            f"{m['ttft_p50_s'] or 0:>10.3f}{m['ttft_p99_s'] or 0:>8.3f}"
            f"{m['tpot_p50_s'] or 0:>10.4f}{m['tpot_p99_s'] or 0:>8.4f}"
        )
    return "\n".join(rows)


def plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the eval extra is optional for the figures
        return
    levels = summary["levels"]
    m = summary["methods"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(levels, [m[f"sched@{c}"]["tokens_per_s"] for c in levels], "o-", label="scheduler")
    ax.plot(levels, [m[f"hf-batch@{c}"]["tokens_per_s"] for c in levels], "s-", label="HF batch")
    ax.axhline(m["engine-seq"]["tokens_per_s"], ls="--", c="gray", label="engine, batch 1")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out / "throughput.png")
    print(table(summary))
    record = {
        k: summary[k] for k in ("benchmark", "num_prompts", "max_new_tokens", "levels", "warnings")
    }
    record["tokens_per_s"] = {k: v["tokens_per_s"] for k, v in summary["methods"].items()}
    print(json.dumps(record), file=sys.stdout)


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)
