"""Load test of a running `medusa-engine serve`: N streamed requests, C in flight, bounded time.

    python -m eval.load_test --url http://127.0.0.1:8000 --requests 1000 --concurrency 16 \\
        --max-tokens 64 --prompts stories [--pid PID] [--out results.json]

Localhost only (the URL must name a loopback address): this measures our server, not a network.
Each request is a streamed chat completion (or a completion, `--endpoint completions`) over the
stdlib HTTP client, one thread per in-flight request; prompts cycle through the chosen set.
Per request: latency (send -> last byte), TTFT (send -> first content), tokens (the usage chunk).
A request is an *error* when the server answered with an error status or an error event, and
*lost* when it never completed: the connection broke, no `[DONE]` came, or it was still running
when `--duration` ran out. With `--pid` the server's resident memory (VmRSS, /proc/PID/status) is
sampled every `--memory-every` seconds: first, last, peak and the growth over the second half of
the run (flat memory: near 0).

Prints a table, then one JSON line (the artefact; `--out` also writes it).
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from eval.metrics import percentile
from eval.prompts import load_prompts

# `--prompts stories`: openings for the TinyStories model (stories260k: 512-token context, so
# MT-Bench questions would not leave room to answer).
STORIES = (
    "Once upon a time",
    "One day, a little girl named Lily",
    "Tom had a red ball",
    "The sun was shining and",
    "There was a big dog who",
    "Sara and Ben went to the park",
    "A little bird sat on a tree",
    "The cat was very hungry",
)


@dataclass
class Outcome:
    ok: bool = False
    lost: bool = False
    status: int = 0
    error: str = ""
    latency_s: float = 0.0
    ttft_s: float | None = None
    tokens: int = 0


@dataclass
class MemorySampler:
    """VmRSS of a process (kB -> MiB), sampled in a thread."""

    pid: int
    every_s: float
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise OSError(f"no VmRSS for process {self.pid}")

    def run(self) -> None:
        start = time.perf_counter()
        while True:
            try:
                self.samples.append((time.perf_counter() - start, self.rss_mib()))
            except OSError:
                return
            if self._stop.wait(self.every_s):
                return

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        values = [v for _, v in self.samples]
        half = values[len(values) // 2 :]
        return {
            "rss_first_mib": values[0],
            "rss_last_mib": values[-1],
            "rss_peak_mib": max(values),
            "rss_growth_second_half_mib": half[-1] - half[0],
            "samples": len(values),
        }


def check_local(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http":
        raise ValueError(f"--url must be http://..., got {url!r}")
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if not local:
        raise ValueError(f"the load test runs against localhost only, got host {host!r}")
    return host, parts.port or 80


def one_request(
    host: str, port: int, body: dict, path: str, api_key: str | None, deadline: float
) -> Outcome:
    """Send one streamed request and read it to `[DONE]` (or the deadline)."""
    out = Outcome()
    if time.monotonic() >= deadline:  # never sent: the run's time was up
        out.lost, out.error = True, "not sent: --duration ran out"
        return out
    start = time.perf_counter()
    timeout = max(deadline - time.monotonic(), 0.1)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        connection.request("POST", path, json.dumps(body), headers)
        response = connection.getresponse()
        out.status = response.status
        if response.status != 200:
            out.error = response.read().decode(errors="replace")[:200]
            return out
        done = False
        for raw in response:  # server-sent events, one `data: ...` line each
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                out.error = event["error"].get("message", "error event")[:200]
                return out
            if event.get("usage"):
                out.tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - start
            if time.monotonic() > deadline:
                break
        out.ok, out.lost = done, not done
    except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out
        out.lost, out.error = True, f"{type(err).__name__}: {err}"[:200]
    finally:
        out.latency_s = time.perf_counter() - start
        connection.close()
    return out


def run(args: argparse.Namespace) -> dict:
    host, port = check_local(args.url)
    prompts = (
        list(STORIES) if args.prompts == "stories" else [p.text for p in load_prompts(args.prompts)]
    )
    chat = args.endpoint == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def body(i: int) -> dict:
        text = prompts[i % len(prompts)]
        request: dict = {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if args.seed is not None:
            request["seed"] = args.seed + i
        if chat:
            request["messages"] = [{"role": "user", "content": text}]
        else:
            request["prompt"] = text
        return request

    sampler = MemorySampler(args.pid, args.memory_every) if args.pid else None
    if sampler is not None:
        sampler.rss_mib()  # fails now, in one line, for a bad pid
        threading.Thread(target=sampler.run, daemon=True).start()
    deadline = time.monotonic() + args.duration
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = [
            pool.submit(one_request, host, port, body(i), path, args.api_key, deadline)
            for i in range(args.requests)
        ]
        outcomes = [f.result() for f in futures]
    wall = time.perf_counter() - start
    if sampler is not None:
        sampler._stop.set()
    done = [o for o in outcomes if o.ok]
    latencies = [o.latency_s for o in done]
    ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
    tokens = sum(o.tokens for o in done)
    return {
        "url": args.url,
        "endpoint": path,
        "model": args.model,
        "prompts": args.prompts,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "completed": len(done),
        "errors": sum(1 for o in outcomes if not o.ok and not o.lost),
        "lost": sum(1 for o in outcomes if o.lost),
        "first_errors": sorted({o.error for o in outcomes if o.error})[:5],
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "requests_per_s": len(done) / wall if wall > 0 else 0.0,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(
            [(o.latency_s - o.ttft_s) / (o.tokens - 1) for o in done if o.ttft_s and o.tokens > 1],
            50,
        ),
        "memory": sampler.summary() if sampler is not None else {},
        "server_metrics": server_metrics(host, port),
        "client_load_avg_1m": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def server_metrics(host: str, port: int) -> dict[str, float]:
    """A few of the server's own /metrics samples after the run (τ, steps, KV in use)."""
    wanted = (
        "tau",
        "steps_total",
        "row_steps_total",
        "kv_cache_bytes_in_use",
        "kv_cache_bytes_peak",
    )
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        connection.close()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in ("#", ""))
    return {k: float(samples[f"medusa_{k}"]) for k in wanted if f"medusa_{k}" in samples}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.load_test", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (localhost only)")
    p.add_argument("--model", default="stories260k", help="the served model's name")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument(
        "--prompts",
        default="stories",
        help="'stories' (openings for stories260k), an eval.prompts set (mt_bench) or a .jsonl",
    )
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="request i gets seed + i")
    p.add_argument("--duration", type=float, default=1800.0, help="stop after this many seconds")
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None, help="sample this process's memory (VmRSS)")
    p.add_argument("--memory-every", type=float, default=1.0)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1 or args.duration <= 0:
        print("load_test: error: requests, concurrency, max-tokens, duration must be positive")
        return 2
    try:
        result = run(args)
    except (ValueError, OSError) as err:
        print(f"load_test: error: {err}", file=sys.stderr)
        return 2
    rows = [
        (
            "completed / errors / lost",
            f"{result['completed']} / {result['errors']} / {result['lost']}",
        ),
        ("tokens/s (aggregate)", f"{result['tokens_per_s']:.1f}"),
        ("latency p50 / p99 s", f"{_s(result['latency_p50_s'])} / {_s(result['latency_p99_s'])}"),
        ("TTFT p50 / p99 s", f"{_s(result['ttft_p50_s'])} / {_s(result['ttft_p99_s'])}"),
        ("wall s", f"{result['wall_s']:.1f}"),
    ]
    memory = result["memory"]
    if memory:
        rows.append(
            (
                "RSS first / last / peak MiB",
                f"{memory['rss_first_mib']:.0f} / {memory['rss_last_mib']:.0f} / "
                f"{memory['rss_peak_mib']:.0f} (2nd-half growth {memory['rss_growth_second_half_mib']:+.1f})",
            )
        )
    for name, value in rows:
        print(f"{name:<30}{value}")
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0 if result["errors"] == 0 and result["lost"] == 0 else 1


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.3f}"


if __name__ == "__main__":
    sys.exit(main())
