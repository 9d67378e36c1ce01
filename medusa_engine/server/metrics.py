"""`GET /metrics`: the scheduler's counters and the server's own, in Prometheus text format 0.0.4.

Written out by hand (a few dozen lines) rather than through `prometheus_client`: one dependency
less, and the engine's numbers are read from `Scheduler.stats()` at scrape time, not mirrored.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

# Seconds; spans a 260K-parameter model's milliseconds to a 7B model's minutes on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PREFIX = "medusa"


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}']
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class ServerMetrics:
    """What the HTTP layer counts (thread-safe): responses by route and status, disconnects,
    stop-string finishes, time to first token and request latency."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses: Counter[tuple[str, int]] = Counter()
        self.disconnects = 0
        self.stopped = 0
        self.in_flight = 0
        self.ttft = Histogram()
        self.latency = Histogram()

    def response(self, route: str, status: int) -> None:
        with self.lock:
            self.responses[(route, status)] += 1

    def started(self) -> None:
        with self.lock:
            self.in_flight += 1

    def finished(self, ttft_s: float | None, latency_s: float, disconnected: bool) -> None:
        with self.lock:
            self.in_flight -= 1
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.latency.observe(latency_s)
            self.disconnects += int(disconnected)

    def stop_string(self) -> None:
        with self.lock:
            self.stopped += 1

    def render(self, stats: Any, model: str) -> str:
        """The exposition text: the server's metrics, then the scheduler's `stats` (a
        `SchedulerStats`)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {PREFIX}_{name} {help}", f"# TYPE {PREFIX}_{name} {kind}"])
            lines.extend(f"{PREFIX}_{s}" for s in samples)

        with self.lock:
            metric(
                "http_responses_total",
                "counter",
                "HTTP responses by route and status code.",
                [
                    f'http_responses_total{{route="{r}",code="{c}"}} {n}'
                    for (r, c), n in sorted(self.responses.items())
                ],
            )
            metric(
                "http_requests_in_flight",
                "gauge",
                "Generation requests being answered.",
                [f"http_requests_in_flight {self.in_flight}"],
            )
            metric(
                "client_disconnects_total",
                "counter",
                "Requests cancelled because their client went away.",
                [f"client_disconnects_total {self.disconnects}"],
            )
            metric(
                "stop_string_finishes_total",
                "counter",
                "Requests ended by a stop string.",
                [f"stop_string_finishes_total {self.stopped}"],
            )
            metric(
                "time_to_first_token_seconds",
                "histogram",
                "From request arrival to its first text.",
                self.ttft.lines("time_to_first_token_seconds"),
            )
            metric(
                "request_latency_seconds",
                "histogram",
                "From request arrival to its last byte.",
                self.latency.lines("request_latency_seconds"),
            )
        row_steps = stats.row_steps_total
        engine: list[tuple[str, str, str, float]] = [
            ("requests_total", "counter", "Requests the scheduler admitted.", stats.requests_total),
            ("generated_tokens_total", "counter", "Tokens generated.", stats.tokens_total),
            ("steps_total", "counter", "Batched verification steps.", stats.steps_total),
            ("row_steps_total", "counter", "Sum over steps of the rows in them.", row_steps),
            ("accepted_tokens_total", "counter", "Tokens emitted by steps.", stats.accepted_total),
            (
                "tau",
                "gauge",
                "Tokens emitted per row per step since the start (accepted / row steps).",
                stats.accepted_total / row_steps if row_steps else 0.0,
            ),
            ("step_latency_seconds", "gauge", "Duration of the last step.", stats.last_step_s),
            ("batch_size", "gauge", "Rows in the last step.", stats.batch_size),
            ("requests_running", "gauge", "Requests holding a cache row.", stats.running),
            ("queue_length", "gauge", "Requests waiting for admission.", stats.queued),
            ("kv_cache_bytes_in_use", "gauge", "KV cache held by requests.", stats.kv_bytes_in_use),
            (
                "kv_cache_bytes_allocated",
                "gauge",
                "KV cache allocated.",
                stats.kv_bytes_allocated,
            ),
            ("kv_cache_bytes_peak", "gauge", "Most KV cache allocated.", stats.kv_bytes_peak),
            ("kv_cache_budget_bytes", "gauge", "KV cache budget.", stats.kv_budget_bytes),
        ]
        for name, kind, help, value in engine:
            metric(name, kind, help, [f"{name} {_number(value)}"])
        metric(
            "model_info", "gauge", "The model served.", [f'model_info{{model="{_label(model)}"}} 1']
        )
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A label value escaped as the text format requires."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


class RouteMetrics:
    """ASGI middleware: counts every response by route and status (a pure ASGI wrapper, not
    `BaseHTTPMiddleware`, which gets in the way of streaming and disconnect detection)."""

    def __init__(self, app: Any, metrics: ServerMetrics, routes: Sequence[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"  # unknown paths: one label

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(route, message["status"])
            await send(message)

        await self.app(scope, receive, counted)
