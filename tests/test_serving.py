"""The cross-request batcher (`dalle_mini.serving.Batcher`) on the tiny random pipeline: shared
batches give each request its own pixels, faults and departures stay with their request, and
closing finishes what was asked.

Requests stay at 8 candidates or fewer in all, so every batch uses the one compiled size.
"""

import platform
import shutil
import threading
import time

import numpy as np
import pytest
from tiny_pipeline import build_tiny_pipeline

from dalle_mini import serving
from dalle_mini.pipeline import Pipeline
from dalle_mini.serving import Batcher, MemoryReleaser, ShuttingDown


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder)


def ask(pipe, prompt="a red circle", **knobs):
    knobs = {"num_images": 2, "num_candidates": 2, "seed": 0, **knobs}
    return pipe.request(prompt, **knobs)


def collect(batcher, request):
    return list(batcher.stream(request))


def run_together(batcher, requests):
    """Streams every request from its own thread, as web handlers do; returns updates or errors."""
    outcomes = [None] * len(requests)

    def one(index):
        try:
            outcomes[index] = collect(batcher, requests[index])
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcomes[index] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def pixels(result):
    return [np.asarray(image) for image in result.images]


def test_batched_requests_get_the_pixels_they_get_alone(pipe):
    requests = [
        ask(pipe, "a red circle", seed=3),
        ask(pipe, "two green squares", seed=7, temperature=0.7, top_k=20, num_candidates=3),
        ask(pipe, "a purple star", seed=3, top_p=0.9, condition_scale=4.0),
    ]
    batcher = Batcher(pipe, window_s=1.0, max_rows=8)
    try:
        outcomes = run_together(batcher, requests)
    finally:
        assert batcher.close(timeout=60)
    assert batcher.batches_run == 1  # one shared sampler batch for the three
    for request, updates in zip(requests, outcomes, strict=True):
        *previews, result = updates
        assert previews and all(p.is_preview for p in previews)
        assert result.prompt == request.prompt and result.settings[0].seed == request.seed
        *_, alone = pipe.stream_requests([request], previews=False)
        for batched_image, alone_image in zip(pixels(result), pixels(alone[0]), strict=True):
            np.testing.assert_array_equal(batched_image, alone_image)


def test_a_full_batch_leaves_the_rest_for_the_next(pipe):
    requests = [ask(pipe, f"shape {i}", seed=i, num_candidates=3) for i in range(3)]
    batcher = Batcher(pipe, window_s=1.0, max_rows=6)
    try:
        outcomes = run_together(batcher, requests)
    finally:
        batcher.close(timeout=60)
    assert batcher.batches_run == 2  # 3 + 3 rows, then the last 3
    assert [updates[-1].prompt for updates in outcomes] == [r.prompt for r in requests]


def test_an_exception_fails_only_its_request(pipe, monkeypatch):
    real_score = pipe.score

    def score(prompt, images):
        if prompt == "explode":
            raise RuntimeError("scoring broke on this prompt")
        return real_score(prompt, images)

    monkeypatch.setattr(pipe, "score", score)
    requests = [ask(pipe, "a red circle", seed=1), ask(pipe, "explode"), ask(pipe, "a star")]
    batcher = Batcher(pipe, window_s=1.0, max_rows=8)
    try:
        first, failed, third = run_together(batcher, requests)
        assert isinstance(failed, RuntimeError) and "scoring broke" in str(failed)
        assert first[-1].prompt == "a red circle" and third[-1].prompt == "a star"
        assert len(first[-1].images) == 2
        # The worker survives: the next request is served.
        assert collect(batcher, ask(pipe, "after the fault"))[-1].prompt == "after the fault"
    finally:
        assert batcher.close(timeout=60)


def test_the_next_batch_is_sampled_while_a_caller_finishes_its_own(pipe, monkeypatch):
    """Decoding, scoring and ranking run in each caller's thread: a request whose scoring is
    slow does not hold up the next batch, and gets its own result once its scoring ends."""
    real_score, release = pipe.score, threading.Event()

    def score(prompt, images):
        if prompt == "slow to score":
            assert release.wait(60)
        return real_score(prompt, images)

    monkeypatch.setattr(pipe, "score", score)
    batcher = Batcher(pipe, window_s=0.0, max_rows=2)  # one request per batch
    outcome = {}
    slow = threading.Thread(
        target=lambda: outcome.update(slow=collect(batcher, ask(pipe, "slow to score")))
    )
    try:
        slow.start()
        deadline = time.monotonic() + 60
        while batcher.batches_run < 1:  # the slow request is sampled, its finishing handed over
            assert time.monotonic() < deadline, "the worker waited for the caller's finishing"
            time.sleep(0.01)
        later = collect(batcher, ask(pipe, "asked later", seed=4))[-1]
        assert later.prompt == "asked later" and "slow" not in outcome
        assert batcher.batches_run == 2
        release.set()
        slow.join(60)
        assert outcome["slow"][-1].prompt == "slow to score"
        assert len(outcome["slow"][-1].images) == 2
    finally:
        release.set()
        assert batcher.close(timeout=60)


class CountingPipe:
    """The pipeline, counting the updates each batch produced and whether it was cut short."""

    def __init__(self, pipe):
        self.pipe, self.batches = pipe, []

    def stream_requests(self, requests, previews=True, **options):
        record = {"prompts": [r.prompt for r in requests], "updates": 0, "finished": False}
        self.batches.append(record)
        for update in self.pipe.stream_requests(requests, previews=previews, **options):
            record["updates"] += 1
            yield update
        record["finished"] = True


def test_a_caller_who_leaves_frees_the_sampler(pipe):
    counting = CountingPipe(pipe)
    batcher = Batcher(counting, window_s=0.0, max_rows=8)
    try:
        stream = batcher.stream(ask(pipe, "left early"))
        assert next(stream).is_preview
        stream.close()  # the client disconnected after its first preview
        waiting = batcher.submit(ask(pipe, "never mind"))
        waiting.cancel()  # left while queued: never sampled
        result = collect(batcher, ask(pipe, "stayed"))[-1]
        assert result.prompt == "stayed"
    finally:
        assert batcher.close(timeout=60)
    left, stayed = counting.batches
    assert left["prompts"] == ["left early"] and not left["finished"]
    assert stayed["prompts"] == ["stayed"] and stayed["finished"]


def test_close_finishes_queued_requests_and_refuses_new_ones(pipe):
    batcher = Batcher(pipe, window_s=0.2, max_rows=2)
    tickets = [batcher.submit(ask(pipe, f"queued {i}", seed=i)) for i in range(3)]
    assert batcher.close(timeout=60)
    for index, ticket in enumerate(tickets):
        updates = []
        while not ticket.updates.empty():
            updates.append(ticket.updates.get())
        kind, finish = updates[-1]  # sampled; decoding and ranking are the caller's part
        assert kind == "finish" and finish().prompt == f"queued {index}"
    with pytest.raises(ShuttingDown, match="shutting down"):
        batcher.submit(ask(pipe))


def test_model_files_broken_after_start_do_not_stop_serving(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "model")
    pipe = Pipeline.from_pretrained(copy)
    before = pipe("a red circle", num_images=2, num_candidates=2, seed=5)
    (copy / "dallebart" / "flax_model.msgpack").unlink()
    (copy / "vqgan" / "flax_model.msgpack").write_bytes(b"not msgpack")
    (copy / "clip" / "open_clip_model.safetensors").write_bytes(b"\0" * 16)
    shutil.rmtree(copy / "dallebart", ignore_errors=True)
    batcher = Batcher(pipe, window_s=0.0)
    try:
        after = collect(batcher, ask(pipe, "a red circle", seed=5))[-1]
    finally:
        assert batcher.close(timeout=60)
    for image_before, image_after in zip(pixels(before), pixels(after), strict=True):
        np.testing.assert_array_equal(image_before, image_after)
    assert after.scores == before.scores


def test_the_batcher_refuses_what_is_not_a_request(pipe):
    batcher = Batcher(pipe)
    try:
        with pytest.raises(TypeError, match="GenerationRequest"):
            batcher.submit("a red circle")
    finally:
        batcher.close(timeout=10)
    with pytest.raises(ValueError, match="window_s"):
        Batcher(pipe, window_s=-1)


def test_the_worker_hands_free_memory_back_between_batches(pipe, monkeypatch):
    """Against the RSS creep of a long-running server (glibc arenas filling with free blocks)."""
    trims = []
    monkeypatch.setattr(serving, "release_free_memory", lambda: trims.append(1) or True)
    batcher = Batcher(pipe, window_s=0.0, max_rows=8)
    batcher._release_memory.interval_s = 0.0
    try:
        for seed in range(2):
            collect(batcher, ask(pipe, seed=seed))
    finally:
        assert batcher.close(timeout=60)
    assert batcher.batches_run == 2 and len(trims) == 2
    hourly = MemoryReleaser(interval_s=3600)
    hourly(), hourly()
    assert len(trims) == 3  # the second call within the hour was skipped


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_server_caps_the_allocator_arenas_before_loading(monkeypatch):
    """Against the RSS creep that trimming alone left (about 3 MB a minute in a soak)."""
    import app

    assert serving.limit_allocator_arenas(serving.SERVER_ARENAS)  # glibc accepts the setting
    calls = []
    monkeypatch.setattr(app, "limit_allocator_arenas", lambda: calls.append("arenas"))

    def no_model(*args, **kwargs):
        calls.append("load")
        raise ValueError("no such model")

    monkeypatch.setattr(app.Pipeline, "from_pretrained", no_model)
    with pytest.raises(SystemExit, match="no such model"):
        app.main(["--model", "missing"])
    assert calls == ["arenas", "load"]
