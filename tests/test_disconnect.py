"""A client that disconnects mid-generation frees its slot: through the real app over loopback.

The app is built and launched as `app.main` does (`app.serve`, `app.launch`) in this process,
on the tiny random pipeline slowed down to a known pace (one preview per row of codes, a pause
after each), with one handler at a time (`--concurrency 1`). A raw HTTP client joins Gradio's
queue, reads the event stream until the first preview, and hangs up. The test then checks what
the server did: the abandoned batch stopped early (the batcher's counter and the pipeline's
own record), no handler is left running, and a following request is answered.
"""

import http.client
import importlib
import json
import sys
import threading
import time
import uuid

import pytest
from test_app import ROOT, free_port
from tiny_pipeline import build_tiny_pipeline

from dalle_mini.pipeline import Pipeline

SLOW_PREFIX = "slow"
# After the hang-up Gradio notices the closed stream when the next preview is sent, and drops
# the handler at the one after; a slow request's 6 previews left take 9 s, ample slack.
PAUSE_S = 1.5
KNOBS = [1.0, 50, 1.0, 10.0, 9]  # temperature, top_k, top_p, condition_scale, num_candidates


class PacedPipeline(Pipeline):
    """The pipeline, slowed for a request whose prompt starts with "slow": after its first
    preview it waits until the test has hung up, then pauses after every update. Records how
    many updates each batch made and whether it ran to the end."""

    batches: list[dict]
    hung_up: threading.Event

    def stream_requests(self, requests, previews=True, **options):
        record = {"prompts": [r.prompt for r in requests], "updates": 0, "finished": False}
        self.batches.append(record)
        is_slow = any(r.prompt.startswith(SLOW_PREFIX) for r in requests)
        for update in super().stream_requests(requests, previews=previews, **options):
            record["updates"] += 1
            yield update
            if is_slow:
                self.hung_up.wait(60)
                time.sleep(PAUSE_S)
        record["finished"] = True


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(port, pipe, handlers, batcher) of the app serving the paced tiny pipeline."""
    sys.path.insert(0, str(ROOT))  # app.py is not part of the package
    app = importlib.import_module("app")
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    pipe = PacedPipeline.from_pretrained(folder, preview_rows=1)
    pipe.batches, pipe.hung_up = [], threading.Event()
    pipe("compile every step first", num_images=9, num_candidates=9)
    pipe.batches.clear()
    port = free_port()
    args = app.parse_args(
        ["--port", str(port), "--host", "127.0.0.1", "--concurrency", "1", "--batch-window", "0"]
    )
    demo, handlers, batcher = app.serve(pipe, args, tmp_path_factory.mktemp("results"))
    app.launch(demo, args)
    try:
        yield port, pipe, handlers, batcher
    finally:
        demo.close()
        batcher.close(timeout=30)


def generate_fn_index(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/config")
    config = json.loads(connection.getresponse().read())
    connection.close()
    (fn_id,) = [d["id"] for d in config["dependencies"] if d.get("api_name") == "generate"]
    return fn_id


def join_queue(port: int, fn_index: int, prompt: str, seed: int) -> str:
    """Queues a /generate request as the web page does; returns its session hash."""
    session = uuid.uuid4().hex[:11]
    body = {"data": [prompt, *KNOBS, seed], "fn_index": fn_index, "session_hash": session}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(
        "POST", "/gradio_api/queue/join", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    response.read()
    connection.close()
    return session


def read_events(port: int, session: str):
    """The open connection and an iterator over the JSON events of the session's stream."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", f"/gradio_api/queue/data?session_hash={session}")
    response = connection.getresponse()
    assert response.status == 200

    def events():
        for line in response:
            if line.startswith(b"data:"):
                yield json.loads(line[5:])

    return connection, events()


def wait_for(condition, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_client_that_hangs_up_mid_generation_frees_its_slot(served):
    port, pipe, handlers, batcher = served
    fn_index = generate_fn_index(port)
    abandoned = join_queue(port, fn_index, f"{SLOW_PREFIX} red circle", seed=1)
    connection, events = read_events(port, abandoned)
    kinds = []
    for event in events:
        kinds.append(event["msg"])
        if event["msg"] == "process_generating":
            break  # the first preview arrived: the request is in the middle of its generation
    assert kinds[-1] == "process_generating", kinds
    connection.sock.shutdown(2)  # the visitor closed the tab
    connection.close()
    pipe.hung_up.set()

    # The next visitor gets the one slot and an answer.
    following = join_queue(port, fn_index, "a purple star", seed=2)
    connection, events = read_events(port, following)
    final = next(e for e in events if e["msg"] == "process_completed")
    connection.close()
    assert final["success"], final
    gallery, status, *_ = final["output"]["data"]
    assert len(gallery) == 9 and "seed 2." in status

    # The abandoned batch stopped early instead of decoding and scoring for nobody.
    assert wait_for(lambda: handlers._active == 0)
    slow, fast = pipe.batches
    assert slow["prompts"] == [f"{SLOW_PREFIX} red circle"] and fast["prompts"] == ["a purple star"]
    assert not slow["finished"] and slow["updates"] < 8, slow
    assert fast["finished"]
    assert batcher.batches_abandoned == 1
