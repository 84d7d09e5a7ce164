"""Cross-request batching for a server: concurrent requests share one sampler batch.

Web handlers run in many threads, each with one `GenerationRequest`. `Batcher.stream(request)`
hands the request to a single worker thread and yields what the pipeline makes for it: the
previews, then the `Result`. The worker waits a short window after the first pending request
for others to arrive, samples up to `max_rows` candidates of them together with
`Pipeline.stream_requests`, and routes each request's previews back to its caller, then the
work that finishes it (decoding, CLIP scoring, ranking), which the caller's own thread does
while the worker samples the next batch. Every candidate keeps its own PRNG key and is decoded
alone, so a request gets the same pixels batched or alone.

    batcher = Batcher(pipe, window_s=0.05, max_rows=256)
    for update in batcher.stream(pipe.request("a red circle", seed=3)):
        ...                                   # Preview, Preview, ..., Result
    batcher.close()                           # refuses new requests, finishes the queued ones

Faults stay local: when a shared batch raises, each of its requests is sampled again alone, so
only the one that fails gets the error; a request whose finishing raises fails alone, in its
caller's thread. A caller that stops listening (a closed generator, a
disconnected client) cancels its request; a batch whose callers all left stops early.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from dalle_mini.batching import batch_size_for
from dalle_mini.settings import GenerationRequest

LOG = logging.getLogger("dalle_mini.serving")
_PREVIEW, _FINISH, _ERROR = "preview", "finish", "error"


class ShuttingDown(RuntimeError):
    """The batcher is closing: it takes no new requests."""


@dataclasses.dataclass(eq=False)
class Ticket:
    """One submitted request: its updates arrive on `updates` as (kind, value) pairs."""

    request: GenerationRequest
    updates: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The caller left: skip the request if it has not started, drop its updates if it has."""
        self.cancelled.set()

    def _send(self, kind: str, value: Any) -> None:
        if not self.cancelled.is_set():
            self.updates.put((kind, value))


class Batcher:
    """Gathers concurrent requests into shared sampler batches on one worker thread.

    Args:
      pipe: the `Pipeline` to sample with.
      window_s: how long the worker waits, after the first pending request, for more to join.
      max_rows: the most candidates in one batch (a larger single request runs alone).
      previews: pass the pipeline's progressive previews on to the callers.
    """

    def __init__(self, pipe, *, window_s: float = 0.05, max_rows: int = 256, previews=True):
        if window_s < 0 or max_rows < 1:
            raise ValueError("window_s must be >= 0 and max_rows >= 1")
        self.pipe, self.window_s, self.max_rows, self.previews = pipe, window_s, max_rows, previews
        self._pending: collections.deque[Ticket] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self.batches_run = 0  # batches sampled so far (for logs and tests)
        self.batches_abandoned = 0  # batches stopped early because every caller left
        self._release_memory = MemoryReleaser()  # between batches, at most every 10 s
        self._worker = threading.Thread(target=self._run, name="dalle-mini-batcher", daemon=True)
        self._worker.start()

    # -- the callers' side -----------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Ticket:
        """Queues `request`; raises ShuttingDown once `close` was called."""
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"expected a GenerationRequest (pipe.request(...)), got {request!r}")
        ticket = Ticket(request)
        with self._wake:
            if self._closing:
                raise ShuttingDown("the server is shutting down; try again in a moment")
            self._pending.append(ticket)
            self._wake.notify_all()
        return ticket

    def stream(self, request: GenerationRequest) -> Iterator[Any]:
        """Yields the request's previews, then its Result; raises what its generation raised.
        Closing the generator early cancels the request."""
        ticket = self.submit(request)
        held = None  # an update read ahead while skipping stale previews
        try:
            while True:
                kind, value = held or ticket.updates.get()
                held = None
                while kind == _PREVIEW and not ticket.updates.empty():
                    update = ticket.updates.get()  # a caller behind skips to the newest preview
                    if update[0] != _PREVIEW:
                        held = update
                        break
                    kind, value = update
                if kind == _ERROR:
                    raise value
                if kind == _FINISH:  # decode, score and rank here, in the caller's thread
                    yield value()
                    return
                yield value
        finally:
            ticket.cancel()

    def close(self, timeout: float | None = None) -> bool:
        """Refuses new requests, finishes every queued and running one, stops the worker.
        Returns False if they did not finish within `timeout` seconds."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    # -- the worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._gather()) is not None:
            if batch:
                self._sample(batch)
                self.batches_run += 1
                self._release_memory()

    def _gather(self) -> list[Ticket] | None:
        """The next batch (cancelled requests dropped); None once closing with nothing left."""
        with self._wake:
            while not self._pending and not self._closing:
                self._wake.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.window_s
            while not self._closing and self._rows_ready() < self.max_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            batch, rows = [], 0
            while self._pending:
                ticket = self._pending[0]
                size = ticket.request.num_candidates
                if batch and rows + size > self.max_rows:
                    break
                self._pending.popleft()
                if not ticket.cancelled.is_set():
                    batch.append(ticket)
                    rows += size
            return batch

    def _rows_ready(self) -> int:
        return sum(t.request.num_candidates for t in self._pending if not t.cancelled.is_set())

    def _sample(self, tickets: Sequence[Ticket]) -> None:
        try:
            self._stream(tickets)
        except Exception as error:  # noqa: BLE001 - routed to the request(s) it belongs to
            if len(tickets) == 1:
                LOG.warning("a request failed: %r", error)
                tickets[0]._send(_ERROR, error)
                return
            LOG.warning("a batch of %d failed (%r); sampling each alone", len(tickets), error)
            for ticket in tickets:
                if not ticket.cancelled.is_set():
                    self._sample([ticket])

    def _stream(self, tickets: Sequence[Ticket]) -> None:
        rows = sum(t.request.num_candidates for t in tickets)
        LOG.info("sampling %d request(s), %d candidates, in one batch", len(tickets), rows)
        # the batch's last update carries, per request, the function that finishes it (decode,
        # score, rank): each caller runs its own, so this worker samples the next batch meanwhile
        updates = self.pipe.stream_requests(
            [t.request for t in tickets], previews=self.previews, defer_finish=True
        )
        try:
            for done, update in enumerate(updates):
                if all(t.cancelled.is_set() for t in tickets):  # free the sampler for the next
                    LOG.info("every caller left: batch stopped after %d update(s)", done)
                    self.batches_abandoned += 1
                    return
                kind = _FINISH if callable(update[0]) else _PREVIEW
                for ticket, item in zip(tickets, update, strict=True):
                    ticket._send(kind, item)
        finally:
            updates.close()


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    return getattr(_libc(), "malloc_trim", None)


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
SERVER_ARENAS = 2


def limit_allocator_arenas(arenas: int = SERVER_ARENAS) -> bool:
    """Caps how many arenas glibc's allocator opens for new threads (by default up to 8 per
    core, each keeping its own freed, fragmented blocks); False where it cannot.

    Call it at start-up, before the server's threads allocate. Measured with `bench/soak.py`
    (12 minutes, 4 people, embedded model): RSS after warm-up grew 2.98 MB per minute with the
    default arenas and 0.17 MB per minute with two (set as MALLOC_ARENA_MAX=2), at the same
    request rate."""
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1


def release_free_memory() -> bool:
    """Returns the memory the C allocator holds free to the system; False where it cannot.

    A server allocates from many threads (Gradio's workers, XLA's), and glibc gives each its own
    arena; freed blocks stay in those arenas, fragmented, so RSS creeps up while the live data
    stays flat (a soak measured the arenas about 45% free and growing, and Python's own
    allocations flat). malloc_trim(0) hands back the free pages of every arena."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class MemoryReleaser:
    """Calls `release_free_memory` at most every `interval_s` seconds: a trim takes 10-400 ms
    on a busy 2-core machine, too long to pay after every request."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._last = -float("inf")
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                return
            self._last = now
        release_free_memory()


def warm_up(pipe, candidates: int, max_rows: int) -> None:
    """Compiles the sampler for every batch size up to `max_rows` candidates (requests of
    `candidates` each, fewer for the small sizes), so no visitor waits for a compilation."""
    high = batch_size_for(max(max_rows, candidates))
    for size in (8 << i for i in range(high.bit_length())):
        if size > high:
            break
        each = min(size, candidates)
        requests = [
            pipe.request("warm up", num_images=min(9, each), num_candidates=each, seed=i)  # 3×3
            for i in range(size // each)
        ]
        for _ in pipe.stream_requests(requests, previews=False):
            pass
        LOG.info("sampler compiled for %d rows", size)


def wait_for_stop() -> None:
    """Blocks until SIGINT or SIGTERM (a server's cue to drain and stop)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
