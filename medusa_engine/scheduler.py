"""Continuous batching: requests join and leave the batch between steps. No HTTP here.

`Scheduler.submit` queues a request and returns its id; the scheduler's loop (`step`, or a
background thread from `start`) then, each iteration:

1. retires cancelled requests (their cache rows are free at once);
2. admits the next queued request when a row is free and the KV memory budget can hold it
   (otherwise it waits in the queue; one that could never fit is refused at `submit`);
3. feeds at most `prefill_chunk` prompt tokens of the request being prefilled (one at a time,
   in arrival order), so a long prompt delays the running rows by one chunk per step, not by
   its whole prefill;
4. runs one batched verification step (`batch.BatchDecoder`) over every prefilled row, with the
   tree and lookup branch planned for that batch size (`plans`: smaller trees as B grows);
5. delivers each request's new tokens through its callback, and retires the ones that finished
   (EOS, token budget, context end).

Cache rows stay packed: decoding rows first, then the row being prefilled, so that a step reads
plain views of the cache. The cache (`RowKVCache`) grows in rows and slots by doubling, within
the budget: its allocation, not an estimate, is what the budget bounds.

Threading: `submit`, `cancel` and `stats` may be called from any thread; callbacks run on the
scheduler's thread (keep them short: hand the event to your own queue). The scheduler drives its
engine: it sets the engine's tree and lookup branch to the plan of each step's batch size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from medusa_engine.batch import BatchDecoder, RowState
from medusa_engine.config import SamplingConfig
from medusa_engine.drafters import LookupBranch
from medusa_engine.dynamic_tree import DynamicTree
from medusa_engine.generate import MedusaGenerator, cut_at_finish
from medusa_engine.model import ContextOverflowError
from medusa_engine.tree import TreeBuffers

log = logging.getLogger(__name__)

Tree = TreeBuffers | DynamicTree
MIN_SLOTS = 256  # smallest row; rows grow by doubling


@dataclass(frozen=True)
class BatchPlan:
    """How to verify at one batch size: the tree and the prompt-lookup branch's length (0:
    none). Bigger batches want smaller trees: a forward's cost grows with B x nodes."""

    tree: Tree
    lookup: int = 0


@dataclass(frozen=True)
class Request:
    """One generation request: prompt ids, token budget, its own sampling (seeded or not)."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's


@dataclass(frozen=True)
class Event:
    """New tokens of one request; the last event has `finish_reason` ("eos", "length",
    "context", "cancelled" or "error") and the request's totals."""

    request_id: int
    tokens: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0  # verification steps (τ = tokens emitted by them / steps)
    accepted: int = 0  # tokens emitted by verification steps (all but the prefill's first)


@dataclass(frozen=True)
class SchedulerStats:
    running: int
    queued: int
    requests_total: int
    tokens_total: int
    steps_total: int  # batched steps
    row_steps_total: int  # sum over steps of the rows in them
    accepted_total: int  # tokens emitted by steps (τ = accepted_total / row_steps_total)
    last_step_s: float
    batch_size: int
    kv_bytes_in_use: int
    kv_bytes_allocated: int
    kv_bytes_peak: int
    kv_budget_bytes: int


class QueueFullError(RuntimeError):
    """The queue holds `max_queue` requests already."""


class SchedulerClosedError(RuntimeError):
    """The scheduler is shutting down and admits nothing new."""


Callback = Callable[[Event], None]


@dataclass
class _Job:
    id: int
    request: Request
    on_event: Callback
    slots: int  # cache slots the request may need
    row: RowState
    eos: frozenset[int]
    fed: int = 0  # prompt tokens prefilled
    out: list[int] = field(default_factory=list)
    steps: int = 0
    accepted: int = 0
    cancelled: bool = False

    @property
    def prefilled(self) -> bool:
        return self.row.state is not None


class Scheduler:
    """Continuous batching over a `MedusaGenerator` (its model, drafter, tree and lookup)."""

    def __init__(
        self,
        engine: MedusaGenerator,
        *,
        max_batch: int = 8,
        kv_budget_mb: float | None = None,
        max_queue: int = 256,
        prefill_chunk: int = 128,
        plans: Mapping[int, BatchPlan] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        if engine.static:
            raise ValueError("batched decoding does not take static steps (--static-step)")
        if hasattr(engine.drafter, "on_commit"):  # EAGLE-3: one draft cache per session
            raise ValueError(
                "batched decoding drafts with medusa or recurrent heads; eagle3 drafters keep "
                "a draft KV cache per session, which rows do not have yet"
            )
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.plans = dict(plans) if plans else {1: BatchPlan(engine.tree, engine.lookup)}
        if min(self.plans) != 1:
            raise ValueError(f"plans must start at batch size 1, got sizes {sorted(self.plans)}")
        for size, plan in self.plans.items():
            engine.set_tree(plan.tree)  # checks each tree against the drafter
            self.plans[size] = BatchPlan(engine.tree, plan.lookup)
        self._use(self.plans[1])
        widest = max(p.tree.num_nodes + p.lookup for p in self.plans.values())
        self._slack = widest  # one step's tree beyond the kept tokens
        self.token_bytes = self.model.kv_bytes_per_token
        default = max_batch * (self.model.max_context + self._slack) * self.token_bytes
        budget = default if kv_budget_mb is None else int(kv_budget_mb * 2**20)
        if budget < MIN_SLOTS * self.token_bytes:
            raise ValueError(
                f"a KV budget of {budget / 2**20:.1f} MiB is below one row of {MIN_SLOTS} "
                f"tokens ({MIN_SLOTS * self.token_bytes / 2**20:.1f} MiB)"
            )
        self.kv_budget_bytes = budget
        self.cache = self.model.new_row_cache(1, MIN_SLOTS)
        self.decoder = BatchDecoder(engine, self.cache)
        self._rows: list[_Job] = []  # cache row i holds _rows[i]; prefilled ones first
        self._queue: deque[_Job] = deque()
        self._cancel: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self._totals = {"requests": 0, "tokens": 0, "steps": 0, "row_steps": 0, "accepted": 0}
        self._last_step_s = 0.0
        self._peak = self.cache.nbytes
        self._batch_size = 0

    # ---- the caller's side (any thread) -----------------------------------------------------

    def submit(self, request: Request, on_event: Callback) -> int:
        """Queue `request`; `on_event` hears its tokens. Returns its id. Raises
        `ContextOverflowError` when it can never fit (context or KV budget), ValueError for
        bad values, `QueueFullError`, or `SchedulerClosedError` once shutdown began."""
        prompt = tuple(int(t) for t in request.prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if min(prompt) < 0 or max(prompt) >= self.model.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.model.vocab_size})")
        self.model.check_fits(len(prompt) + 1)
        slots = min(len(prompt) + request.max_new_tokens, self.model.max_context) + self._slack
        if _round_up(slots) * self.token_bytes > self.kv_budget_bytes:
            raise ContextOverflowError(
                f"{len(prompt)} prompt + {request.max_new_tokens} new tokens need "
                f"{_round_up(slots) * self.token_bytes / 2**20:.1f} MiB of KV cache, more than "
                f"the whole budget ({self.kv_budget_bytes / 2**20:.1f} MiB)"
            )
        eos = self.model.eos_token_ids if request.eos_token_ids is None else request.eos_token_ids
        generator = torch.Generator(device=self.model.device)
        if request.sampling.seed is not None:
            generator.manual_seed(request.sampling.seed)
        with self._lock:
            if self._closed:
                raise SchedulerClosedError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
            job = _Job(
                self._next_id,
                request,
                on_event,
                slots,
                RowState(request.sampling, generator),
                frozenset(eos),
            )
            self._next_id += 1
            self._queue.append(job)
            self._wake.notify()
        return job.id

    def cancel(self, request_id: int) -> None:
        """End a request (finish reason "cancelled") and free its cache row at the next step."""
        with self._lock:
            self._cancel.add(request_id)
            self._wake.notify()

    def stats(self) -> SchedulerStats:
        with self._lock:
            t = dict(self._totals)
            return SchedulerStats(
                running=len(self._rows),
                queued=len(self._queue),
                requests_total=t["requests"],
                tokens_total=t["tokens"],
                steps_total=t["steps"],
                row_steps_total=t["row_steps"],
                accepted_total=t["accepted"],
                last_step_s=self._last_step_s,
                batch_size=self._batch_size,
                kv_bytes_in_use=self.cache.bytes_in_use,
                kv_bytes_allocated=self.cache.nbytes,
                kv_bytes_peak=self._peak,
                kv_budget_bytes=self.kv_budget_bytes,
            )

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._rows and not self._queue

    # ---- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a background thread until `shutdown`."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already running")
        self._thread = threading.Thread(target=self._loop, name="medusa-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Admit nothing more; finish (`drain`) or cancel the requests in flight; stop the loop."""
        with self._lock:
            self._closed = True
            if not drain:
                self._cancel.update(j.id for j in (*self._rows, *self._queue))
            self._wake.notify()
        if self._thread is None:
            self.run_until_idle()
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        with self._lock:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    def run_until_idle(self) -> None:
        """Step until no request is running or queued (single-threaded use)."""
        while self.step():
            pass

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._rows and not self._queue:
                    self._wake.wait()
                if self._stop:
                    return
            self.step()

    def step(self) -> bool:
        """One iteration (see the module docstring); returns whether work remains."""
        try:
            self._retire_cancelled()
            self._admit()
            self._prefill()
            self._decode()
        except Exception as err:  # a failed step must not take the other requests down silently
            log.exception("scheduler step failed")
            for job in list(self._rows):
                self._finish(job, "error", str(err) or type(err).__name__)
        return not self.idle

    def _retire_cancelled(self) -> None:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            queued = [j for j in self._queue if j.id in cancel]
            for job in queued:
                self._queue.remove(job)
        for job in queued:
            self._emit(job, (), "cancelled")
        for job in [j for j in self._rows if j.id in cancel]:
            self._finish(job, "cancelled")

    def _admit(self) -> None:
        """Take the next queued request into a row if none is being prefilled, a row is free
        and the budget holds the cache it needs (else it waits)."""
        if any(not j.prefilled for j in self._rows) or len(self._rows) >= self.max_batch:
            return
        with self._lock:
            if not self._queue:
                return
            job = self._queue[0]
            rows = len(self._rows) + 1
            slots = max(self.cache.max_length, _round_up(job.slots))
            new_rows = max(self.cache.num_rows, min(_round_up(rows, 1), self.max_batch))
            if new_rows * slots * self.token_bytes > self.kv_budget_bytes:
                new_rows = rows  # the smallest allocation that still holds every row
                if new_rows * slots * self.token_bytes > self.kv_budget_bytes:
                    return  # waits for rows to finish
            self._queue.popleft()
            if (new_rows, slots) != (self.cache.num_rows, self.cache.max_length):
                new_rows = max(new_rows, self.cache.num_rows)
                self.cache.resize(new_rows, slots)
                self._peak = max(self._peak, self.cache.nbytes)
            self._rows.append(job)
            self._totals["requests"] += 1

    def _prefill(self) -> None:
        """Feed up to `prefill_chunk` prompt tokens of the row being prefilled."""
        pending = [i for i, j in enumerate(self._rows) if not j.prefilled]
        if not pending:
            return
        index = pending[0]
        job = self._rows[index]
        prompt = job.request.prompt_ids
        chunk = prompt[job.fed : job.fed + self.prefill_chunk]
        final = job.fed + len(chunk) == len(prompt)
        self.decoder.prefill(index, job.row, chunk, final)
        job.fed += len(chunk)
        if final:
            assert job.row.state is not None
            self._deliver(job, [job.row.state.root], counts_as_step=False)

    def _decode(self) -> None:
        """One batched step over the prefilled rows (rows 0 .. n-1)."""
        ready = [j for j in self._rows if j.prefilled]
        if not ready:
            return
        n = len(ready)
        self._use(self.plans[max(size for size in self.plans if size <= n)])
        start = time.perf_counter()
        emitted = self.decoder.step(range(n), [j.row for j in ready])
        self._last_step_s = time.perf_counter() - start
        self._batch_size = n
        with self._lock:
            self._totals["steps"] += 1
            self._totals["row_steps"] += n
        for job, tokens in zip(ready, emitted, strict=True):
            job.steps += 1
            self._deliver(job, tokens, counts_as_step=True)

    def _use(self, plan: BatchPlan) -> None:
        """Verify the next steps with `plan`'s tree and lookup branch (checked in __init__)."""
        engine = self.engine
        if engine.tree is not plan.tree or engine.lookup != plan.lookup:
            engine.tree = plan.tree
            engine.lookup = plan.lookup
            engine.lookup_branch = LookupBranch(plan.lookup) if plan.lookup > 0 else None

    def _deliver(self, job: _Job, tokens: list[int], counts_as_step: bool) -> None:
        """Emit a row's new tokens, cut at its finish; retire it if it finished."""
        chunk, reason = cut_at_finish(tokens, job.out, job.request.max_new_tokens, job.eos)
        job.out.extend(chunk)
        if counts_as_step:
            job.accepted += len(chunk)
            with self._lock:
                self._totals["accepted"] += len(chunk)
        with self._lock:
            self._totals["tokens"] += len(chunk)
        if reason is None and len(job.row.token_ids) + 1 > self.model.max_context:
            reason = "context"
        if reason is None:
            self._emit(job, tuple(chunk), None)
        else:
            self._finish(job, reason, tokens=tuple(chunk))

    def _finish(
        self, job: _Job, reason: str, error: str | None = None, tokens: tuple[int, ...] = ()
    ) -> None:
        """Retire a row: free its cache row at once and keep the rows packed."""
        index = self._rows.index(job)
        self.cache.free(index)
        # Refill the hole: the last prefilled row moves in (their order does not matter), then
        # the row being prefilled (always last) moves down by one.
        last = len(self._rows) - 1
        moves = []
        if job.prefilled:
            last_ready = max(i for i, j in enumerate(self._rows) if j.prefilled)
            moves.append((last_ready, index))
            if last_ready != last:
                moves.append((last, last_ready))
        elif index != last:
            moves.append((last, index))
        for src, dst in moves:
            if src != dst:
                self.cache.move_row(src, dst)
                self._rows[dst] = self._rows[src]
        self._rows.pop()
        self._emit(job, tokens, reason, error)

    def _emit(
        self, job: _Job, tokens: tuple[int, ...], reason: str | None, error: str | None = None
    ) -> None:
        event = Event(job.id, tokens, reason, error)
        if reason is not None:
            event = Event(
                job.id,
                tokens,
                reason,
                error,
                prompt_tokens=len(job.request.prompt_ids),
                completion_tokens=len(job.out),
                steps=job.steps,
                accepted=job.accepted,
            )
        try:
            job.on_event(event)
        except Exception:  # a caller's bug must not stop the loop
            log.exception("request %d's callback failed", job.id)


def _round_up(n: int, smallest: int = MIN_SLOTS) -> int:
    """The power of two >= n (at least `smallest`): sizes grow by doubling."""
    size = smallest
    while size < n:
        size *= 2
    return size


def generate_all(
    scheduler: Scheduler, requests: Sequence[Request]
) -> list[tuple[list[int], Event]]:
    """Submit `requests` and step until all finish (single-threaded); each one's tokens and
    final event, in order."""
    tokens: dict[int, list[int]] = {}
    final: dict[int, Event] = {}

    def on_event(event: Event) -> None:
        tokens.setdefault(event.request_id, []).extend(event.tokens)
        if event.finish_reason is not None:
            final[event.request_id] = event

    ids = [scheduler.submit(r, on_event) for r in requests]
    scheduler.run_until_idle()
    return [(tokens.get(i, []), final[i]) for i in ids]
