"""Timing and memory helpers for the benchmark harness.

* `sync(device)`: wait for queued device work, so a host clock reads the device's time.
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
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
