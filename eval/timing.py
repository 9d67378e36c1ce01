"""Clocks, CUDA-graph capture, memory peaks and the environment stamp of every benchmark.

One module for what the benchmarks (`harness`, `bench_step`, `bench_attention`, `bench_gemm`,
`bench_overhead`, `bench_diffusion`) measure with, so that they time, capture and stamp alike.
The library keeps its own graph capture (`medusa_engine.static_step`): it cannot import `eval`.

* `sync(device)`: wait for queued device work, so a host clock reads the device's time.
* `time_calls(fn, device, iters=, warmup=, before=, clock=)`: seconds of each timed call;
  `median_ms` reduces them. `clock="wall"`: the host clock between two device syncs (what a
  caller waits, launch overhead and host reads included); `clock="events"`: CUDA events around
  each call queued back to back (device time; the host clock off CUDA).
* `l2_flush(mode)`: what runs before each timed call to leave the GPU's L2 dirty, clean or warm.
* `graph_of(fn)`: `fn` captured in one CUDA graph; returns its replay.
* `CallTimer`: accumulates the wall time of the calls it wraps.
* `HFStepClock`: a streamer for HF `generate` (duck-typed: `put`/`end`). `generate` puts the
  prompt once, then the tokens of each base-model forward: one token per step for greedy search,
  the accepted candidates + bonus token per step for assisted (prompt-lookup) decoding. The clock
  records the time to the first new token and the number of tokens per put (= per forward).
* `first_item_time(iterable, start)`: drain an iterator (the engine's `stream`), timing its first
  item.
* `PeakMemory`: peak memory of a block above what was in use when it began. CUDA:
  `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensor memory only). Linux
  CPU: the process's resident high-water mark `VmHWM`, reset by writing 5 to
  `/proc/self/clear_refs`; pages the allocator already held before the block are not counted, so
  this is a lower bound of the block's working memory. Elsewhere: the growth of `ru_maxrss`, which
  stays 0 unless the process reaches a new all-time peak (reported as such in `source`).
* `environment(device, dtype, load_start)`: the stamp every benchmark's JSON carries: device,
  dtype, threads, load average, versions, git commit and dirtiness, time. It names no folder of
  the machine: paths in stamps go through `repo_relative` (`heads_label` for `--heads`).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
CLOCKS = ("wall", "events")
FLUSHES = ("write", "read", "none")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    iters: int,
    warmup: int = 0,
    before: Callable[[], object] | None = None,
    clock: str = "wall",
) -> list[float]:
    """Seconds of each of `iters` calls of `fn`, after `warmup` untimed calls; `before` runs
    untimed before every call. Clocks as in the module docstring."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; expected one of {CLOCKS}")
    device = torch.device(device)
    if clock == "events" and device.type == "cuda":
        for _ in range(warmup):
            if before is not None:
                before()
            fn()
        events = []
        for _ in range(iters):
            if before is not None:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    seconds = []
    for i in range(warmup + iters):
        if before is not None:
            before()
        sync(device)
        start_s = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start_s)
    return seconds


def median_ms(fn: Callable[[], object], device: torch.device | str, **kwargs: Any) -> float:
    """Median milliseconds of `time_calls(fn, device, **kwargs)`."""
    return 1e3 * statistics.median(time_calls(fn, device, **kwargs))


def l2_flush(mode: str) -> Callable[[], object]:
    """What runs before each timed call: `write` zeroes a 256 MiB buffer (L2 left dirty), `read`
    sums it (L2 left clean), `none` does nothing (L2 warm with the previous call's data)."""
    if mode == "none":
        return lambda: None
    if mode not in FLUSHES:
        raise ValueError(f"unknown flush {mode!r}; expected one of {FLUSHES}")
    scratch = torch.ones(256 * 2**20, dtype=torch.uint8, device="cuda")
    return scratch.zero_ if mode == "write" else scratch.max


def graph_of(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@dataclass
class CallTimer:
    """Accumulates the wall time of the calls it wraps (no device sync: CPU work)."""

    seconds: float = 0.0
    calls: int = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed


class HFStepClock:
    """Streamer for `model.generate(streamer=...)`; see the module docstring."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.ttft_s: float | None = None
        self.step_tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
            return
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.start
        self.step_tokens.append(int(value.numel()))

    def end(self) -> None:
        pass


def first_item_time(items: Iterable[Any], start: float) -> float | None:
    """Consume `items`; seconds from `start` to the first item (None if there was none)."""
    first = None
    for _ in items:
        if first is None:
            first = time.perf_counter() - start
    return first


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_bytes` and `m.source`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.source = _source(self.device)
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.source == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.source == "vmhwm":
            _CLEAR_REFS.write_text("5")
            self._base = _status_kib("VmRSS") * 1024
        else:
            self._base = _maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.source == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.source == "vmhwm":
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        self.peak_bytes = max(0, peak - self._base)


MEMORY_SOURCES = {
    "cuda": "torch.cuda.max_memory_allocated above the allocation at the call's start",
    "vmhwm": "resident high-water mark (VmHWM, reset via /proc/self/clear_refs) above VmRSS at "
    "the call's start; pages the allocator already held are not counted (a lower bound)",
    "maxrss": "growth of getrusage ru_maxrss: 0 unless the process reached a new all-time peak",
}


def _source(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda"
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return "vmhwm"
    except (OSError, KeyError):
        return "maxrss"


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def load_average() -> float:
    """The 1-minute load average (pass it to `environment` as `load_start`)."""
    return os.getloadavg()[0]


def environment(
    device: torch.device | str, dtype: torch.dtype, load_start: float | None = None
) -> dict[str, Any]:
    """The stamp of a benchmark run, taken at its end; `load_avg_1m` is [start, end]."""
    device = torch.device(device)
    status = _git("status", "--porcelain")
    return {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": [
            None if load_start is None else round(load_start, 2),
            round(load_average(), 2),
        ],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": package_version("transformers"),
        "triton": package_version("triton"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def repo_relative(path: str | Path) -> str:
    """`path` (relative to the working directory, or absolute) relative to the repository root,
    with `/` separators: a stamp names no folder of the machine that wrote it."""
    return Path(os.path.relpath(Path(path).expanduser().resolve(), REPO)).as_posix()


def heads_label(heads: str, model: str) -> str:
    """`--heads` for a stamp: `auto` -> `bundled:<alias>` (the alias's bundled heads, if any),
    `none` as is, a folder relative to the repository root."""
    if heads == "none":
        return heads
    if heads != "auto":
        return repo_relative(heads)
    from medusa_engine.models import resolve_model

    source = resolve_model(model)
    if source.bundled_heads is None:
        return "none (auto: no bundled heads)"
    return f"bundled:{source.alias}"


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git(*argv: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()
