"""Benchmark outputs: Spec-Bench answer files, summary.json, summary.md, PNG plots, stdout table.

Files written to the output folder:

* `<method>.jsonl`: one answer per prompt in Spec-Bench's format: `{question_id, category,
  model_id, choices: [{index, turns, new_tokens, wall_time, accept_lengths}], tstamp}`;
* `summary.json` (everything), `summary.md` (tables);
* `speedup_by_category.png` (bars per method), `accept_lengths.png` (histogram of tokens per step
  of the engine methods), `tree_sweep.png` (τ and tokens/s against tree size; only with
  `--tree-sweep`). A plot that cannot be drawn is skipped with a note in both summaries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from eval import metrics

MiB = 1 << 20


def write_all(
    out: Path,
    summary: dict,
    runs: dict[str, list[metrics.PromptRun]],
    texts: dict[str, list[str]],
) -> dict[str, str]:
    """Write every output; returns {what: file name}; `summary["plots"]` gets notes."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for method, method_runs in runs.items():
        name = f"{method}.jsonl"
        write_answers(out / name, method_runs, texts[method])
        files[f"answers:{method}"] = name
    summary["plots"] = plot_all(out, summary, runs)
    files.update({k: v for k, v in summary["plots"].items() if v.endswith(".png")})
    files["summary.json"] = "summary.json"
    files["summary.md"] = "summary.md"
    summary["files"] = files
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return files


def write_answers(path: Path, runs: list[metrics.PromptRun], texts: list[str]) -> None:
    with path.open("w") as f:
        for run, text in zip(runs, texts):
            record = {
                "question_id": run.question_id,
                "category": run.category,
                "model_id": run.method,
                "choices": [{
                    "index": 0,
                    "turns": [text],
                    "new_tokens": [run.new_tokens],
                    "wall_time": [run.wall_s],
                    "accept_lengths": list(run.accept_lengths or []),
                }],
                "tstamp": time.time(),
            }  # fmt: skip
            f.write(json.dumps(record) + "\n")


# ---- plots ------------------------------------------------------------------------------------


def plot_all(out: Path, summary: dict, runs: dict[str, list[metrics.PromptRun]]) -> dict[str, str]:
    """{plot: file name or "skipped: why"}."""
    import matplotlib

    matplotlib.use("Agg")
    results = summary["results"]
    plots = {}
    others = [m for m in results if m != summary["baseline"]]
    if summary["baseline"] in results and others:
        plots["speedup_by_category"] = _plot_speedup(out, results, others)
    else:
        plots["speedup_by_category"] = "skipped: needs the hf baseline and another method"
    engine = {m: r for m, r in runs.items() if m.startswith("medusa") and "@" not in m}
    if engine:
        plots["accept_lengths"] = _plot_hist(out, engine)
    else:
        plots["accept_lengths"] = "skipped: no medusa method ran"
    if summary.get("tree_sweep"):
        plots["tree_sweep"] = _plot_sweep(out, summary)
    else:
        plots["tree_sweep"] = "skipped: --tree-sweep not given"
    return plots


def _plot_speedup(out: Path, results: dict, methods: list[str]) -> str:
    import matplotlib.pyplot as plt

    cats = ["all", *sorted({c for m in methods for c in results[m]["categories"]})]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) * max(1, len(methods)) / 2), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [
            (results[m]["all"] if c == "all" else results[m]["categories"].get(c, {})).get(
                "speedup"
            )
            or 0.0
            for c in cats
        ]
        ax.bar([i + j * width for i in range(len(cats))], vals, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("speedup vs hf (tokens/s ratio)")
    ax.legend()
    return _save(fig, out / "speedup_by_category.png")


def _plot_hist(out: Path, runs: dict[str, list[metrics.PromptRun]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(runs)
    lengths: set[int] = set()
    for j, (m, method_runs) in enumerate(runs.items()):
        hist = metrics.accept_length_histogram(method_runs)
        lengths.update(hist)
        total = sum(hist.values()) or 1
        ax.bar([n + j * width for n in hist], [c / total for c in hist.values()], width, label=m)
    ticks = sorted(lengths)
    ax.set_xticks([n + 0.4 - width / 2 for n in ticks], [str(n) for n in ticks])
    ax.set_xlabel("tokens per step (accepted candidates + 1)")
    ax.set_ylabel("fraction of steps")
    ax.legend()
    return _save(fig, out / "accept_lengths.png")


def _plot_sweep(out: Path, summary: dict) -> str:
    import matplotlib.pyplot as plt

    fig, (ax_tau, ax_tps) = plt.subplots(1, 2, figsize=(10, 4))
    every = sorted(summary["tree_sweep"], key=lambda r: r["nodes"])
    for heads in dict.fromkeys(r.get("heads", "medusa") for r in every):
        rows = [r for r in every if r.get("heads", "medusa") == heads]
        nodes = [r["nodes"] for r in rows]
        ax_tau.plot(nodes, [r["tau"] or 0 for r in rows], marker="o", label=heads)
        ax_tps.plot(nodes, [r["tokens_per_s"] for r in rows], marker="o", label=heads)
    ax_tau.set_xlabel("tree nodes (incl. root)")
    ax_tau.set_ylabel("τ (tokens per step)")
    base = summary["results"].get(summary["baseline"])
    if base:
        ax_tps.axhline(base["all"]["tokens_per_s"], color="black", linestyle="--", label="hf")
    ax_tps.set_xlabel("tree nodes (incl. root)")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.legend()
    for r in every:
        ax_tau.annotate(r["tree"], (r["nodes"], r["tau"] or 0), fontsize=8)
    return _save(fig, out / "tree_sweep.png")


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


# ---- text -------------------------------------------------------------------------------------


def _f(value, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def overall_rows(summary: dict) -> list[list[str]]:
    rows = []
    for m, r in summary["results"].items():
        a, mm = r["all"], r["mismatches"]
        rows.append([
            m, _f(a["tokens_per_s"], ".1f"),
            "–" if a["speedup"] is None else _f(a["speedup"]) + "x",
            _f(a["tau"]), _f(a["ttft_s"], ".1f", 1e3), _f(a["tpot_s"], ".2f", 1e3),
            _f(a["peak_mem_bytes"], ".1f", 1 / MiB), "–" if mm is None else str(mm["count"]),
        ])  # fmt: skip
    return rows


OVERALL_HEAD = ["method", "tok/s", "speedup", "τ", "TTFT ms", "TPOT ms", "peak MiB", "mismatch"]


def table(summary: dict) -> str:
    """Fixed-width overall table for stdout."""
    rows = [OVERALL_HEAD, *overall_rows(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(OVERALL_HEAD))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def markdown(summary: dict) -> str:
    s, results = summary["stamp"], summary["results"]
    lines = [
        f"# medusa-engine bench: {summary['prompts']} ({summary['num_prompts']} prompts, "
        f"{summary['max_new_tokens']} new tokens max)",
        "",
        f"model `{s['model']}` · heads `{s['heads']}` · {s['device']} ({s['device_name']}) · "
        f"{s['dtype']} · {s['threads']} threads · torch {s['torch']} · transformers "
        f"{s['transformers']} · commit {s['git_commit']}{' (dirty)' if s['git_dirty'] else ''} · "
        f"load avg {s['load_avg_1m']} on {s['cpu_count']} CPUs · {s['time_utc']}",
        "",
        *(f"**Warning:** {w}\n" for w in summary.get("warnings", [])),
        "trees: "
        + ", ".join(
            f"{m}: `{t['name']}` ({t['nodes']} nodes incl. root, depth {t['depth']})"
            for m, t in s["trees"].items()
        ),
        "",
        "## Overall",
        "",
        *_md(OVERALL_HEAD, overall_rows(summary)),
        "## Speedup vs hf by category",
        "",
    ]
    methods = list(results)
    cats = summary["categories"]
    rows = [
        [c, str(results[methods[0]]["categories"][c]["prompts"])]
        + [_f(results[m]["categories"][c]["speedup"]) for m in methods]
        for c in cats
    ]
    lines += _md(["category", "prompts", *methods], rows)
    lines += _agreeing(summary)
    lines += _acceptance(results)
    lines += _sweep(summary)
    lines += _mismatch_details(results)
    lines += ["## Plots", ""]
    lines += [
        f"![{k}]({v})" if v.endswith(".png") else f"* {k}: {v}" for k, v in summary["plots"].items()
    ]
    lines += ["", "## Definitions", ""]
    lines += [f"* **{k}**: {v}" for k, v in summary["definitions"].items()]
    return "\n".join(lines) + "\n"


def _agreeing(summary: dict) -> list[str]:
    """The greedy methods on the prompts where their texts all equal hf's (only when some differ)."""
    agree = summary.get("agreeing")
    if not agree or not summary["greedy_mismatches_total"]:
        return []
    rows = [
        [m, _f(a["tokens_per_s"], ".1f"), "–" if a["speedup"] is None else _f(a["speedup"]) + "x",
         _f(a["tau"])]
        for m, a in agree["results"].items()
    ]  # fmt: skip
    return [
        f"## On the {agree['prompts']} of {agree['of']} prompts where every greedy method's text "
        "equals hf's",
        "",
        *_md(["method", "tok/s", "speedup", "τ"], rows),
    ]


def _acceptance(results: dict) -> list[str]:
    rates = {m: r["all"]["acceptance_by_depth"] for m, r in results.items()}
    rates = {m: v for m, v in rates.items() if v and m.startswith("medusa")}
    if not rates:
        return []
    depth = max(len(v) for v in rates.values())
    rows = [[m, *(_f(v[d]) if d < len(v) else "–" for d in range(depth))] for m, v in rates.items()]
    head = ["method", *(f"d={d + 1}" for d in range(depth))]
    return ["## Acceptance rate by depth (steps with accept length > d)", "", *_md(head, rows)]


def _sweep(summary: dict) -> list[str]:
    if not summary.get("tree_sweep"):
        return ["## Tree sweep", "", "Not run (`--tree-sweep` not given).", ""]
    rows = [
        [r.get("heads", ""), r["tree"], str(r["nodes"]), _f(r["tau"]),
         _f(r["tokens_per_s"], ".1f"), _f(r["speedup"])]
        for r in summary["tree_sweep"]
    ]  # fmt: skip
    return [
        "## Tree sweep (greedy engine)",
        "",
        *_md(["heads", "tree", "nodes", "τ", "tok/s", "speedup"], rows),
    ]


def _mismatch_details(results: dict) -> list[str]:
    lines = ["## Greedy mismatches vs hf", ""]
    for m, r in results.items():
        if r["mismatches"] is None:
            continue
        diffs = r["mismatches"]["first_diff"]
        detail = ", ".join(f"q{q} @ token {p}" for q, p in diffs.items()) if diffs else "none"
        lines.append(f"* {m}: {r['mismatches']['count']} ({detail})")
    return [*lines, ""]


def stdout_record(summary: dict) -> dict:
    """The one JSON line: stamp + overall metrics per method."""
    return {
        "benchmark": summary["benchmark"],
        "prompts": summary["prompts"],
        "num_prompts": summary["num_prompts"],
        "max_new_tokens": summary["max_new_tokens"],
        "stamp": summary["stamp"],
        "methods": {
            m: {
                **{k: v for k, v in r["all"].items() if k != "acceptance_by_depth"},
                "greedy_mismatches": None if r["mismatches"] is None else r["mismatches"]["count"],
            }
            for m, r in summary["results"].items()
        },
        "greedy_mismatches_total": summary["greedy_mismatches_total"],
        "warnings": summary.get("warnings", []),
        "tree_sweep": summary["tree_sweep"],
        "files": summary.get("files"),
    }
