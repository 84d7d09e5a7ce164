"""The DALL·E Mini web app (Gradio): type a prompt, watch nine images form, get them ranked.

    python app.py                                  # embedded model on http://127.0.0.1:7860
    python app.py --model mini --port 8080         # published DALL·E Mini (network once)

Runs unchanged as a Hugging Face Space (`app.py` + `requirements.txt`): there `SPACE_ID` is set
and the app listens on 0.0.0.0. A thin layer over `dalle_mini.pipeline.Pipeline`: every request
goes through Gradio's queue (bounded size, position shown), then through a `Batcher` that
samples concurrent requests together in one shared batch (`--no-batching`: one at a time).
Knobs are checked by the pipeline (a bad value becomes a gr.Error naming it, never a
traceback), the only files served are the ones this app writes for a result, and SIGTERM or
Ctrl-C finishes the requests in progress before the server stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from dalle_mini import settings as limits
from dalle_mini.pipeline import Pipeline
from dalle_mini.serving import (
    Batcher,
    MemoryReleaser,
    ShuttingDown,
    limit_allocator_arenas,
    wait_for_stop,
    warm_up,
)

LOG = logging.getLogger("dalle_mini.app")
NUM_IMAGES = 9  # the 3×3 gallery
DEFAULT_CANDIDATES = 32
DRAIN_TIMEOUT_S = 120  # on SIGTERM/SIGINT, how long running requests may take to finish
PUBLISH_GRACE_S = 5.0  # after the last answer: time for clients to fetch its images
SHUTTING_DOWN = "the server is shutting down; try again in a moment"
EXAMPLES = [
    "a red circle on a blue background",
    "a big yellow star in the top left corner",
    "two green squares on a white background",
    "a small blue triangle to the left of a pink heart",
    "a purple star",  # a colour-shape pair the embedded model never saw together
]
NOTE = """**Limits and biases.** Images are small and often imperfect; CLIP picks the nine it
finds closest to the prompt, which is not the same as correct. The embedded model knows only
simple scenes of coloured shapes (its training world); it cannot draw anything else. The
published DALL·E Mini / Mega learned from captioned web images and repeat their biases: they
tend to show stereotypes about people, professions and places, under-represent many groups,
garble faces and text, and can produce offensive images. Do not use them to depict real people
or to make decisions about anyone."""
# Small images stay crisp when the gallery enlarges them.
CSS = "#status {min-height: 1.5em} #gallery img {image-rendering: pixelated}"


class Generator:
    """The app's request handlers around one pipeline (plain methods, testable without a server)."""

    def __init__(self, pipe: Pipeline, output_root: Path, batcher: Batcher | None = None):
        self.pipe = pipe
        self.output_root = output_root
        self.batcher = batcher  # None: each request samples alone, one at a time
        self._active = 0  # requests being handled now
        self._idle = threading.Condition()
        self.closing = False  # set on shutdown: new requests are turned away
        self._release_memory = MemoryReleaser()  # the batcher has its own

    def drain(self, timeout: float) -> bool:
        """Turns new requests away and waits for the ones in progress to be answered."""
        with self._idle:
            self.closing = True
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def _updates(self, request):
        """The request's previews then its Result: through the batcher, or sampled alone."""
        if self.batcher is not None:
            return self.batcher.stream(request)
        return (update for (update,) in self.pipe.stream_requests([request]))

    def generate(self, prompt, temperature, top_k, top_p, condition_scale, num_candidates, seed):
        """Yields (gallery, status, grid file, files, settings) while sampling, then the result."""
        try:
            request = self.pipe.request(
                prompt,
                num_images=NUM_IMAGES,
                num_candidates=num_candidates,
                seed=seed,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                condition_scale=condition_scale,
                rerank=self.pipe.scorer is not None,
            )
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error), title="Cannot generate", print_exception=False) from error
        with self._idle:
            if self.closing:
                raise gr.Error(SHUTTING_DOWN, title="Server busy", print_exception=False)
            self._active += 1
        try:
            yield from self._answer(request)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()
            if self.batcher is None:
                self._release_memory()

    def _answer(self, request):
        updates = self._updates(request)
        try:
            for update in updates:
                if update.is_preview:
                    caption = f"sampling {update.step}/{update.num_steps}"
                    status = f"Sampling codes: {update.step} of {update.num_steps}…"
                    yield (
                        [(image, caption) for image in update.images],
                        status,
                        gr.skip(),
                        gr.skip(),
                        [],
                    )
            yield from self._publish(update)
        except ShuttingDown as error:
            raise gr.Error(str(error), title="Server busy", print_exception=False) from error
        except Exception as error:  # noqa: BLE001 - one request's failure must not show internals
            LOG.exception("generation failed")
            raise gr.Error("generation failed on the server; try again", title="Error") from error
        finally:  # a client that left: its request is cancelled and frees its place in a batch
            updates.close()

    def _publish(self, result):
        folder = Path(tempfile.mkdtemp(prefix="result-", dir=self.output_root))
        try:
            paths = result.save(folder)  # names fixed by the pipeline, never from the request
            ranks = range(1, len(result.images) + 1)
            captions = [f"#{rank}" for rank in ranks]  # without a CLIP, seed order
            if result.scores is not None:
                captions = [
                    f"#{r} · CLIP {s:.3f}" for r, s in zip(ranks, result.scores, strict=True)
                ]
            status = (
                f"{len(result.images)} best of {result.num_candidates} candidates, "
                f"seed {result.settings[0].seed}. Click an image for its settings."
            )
            settings = [s.to_dict() for s in result.settings]
            yield (
                list(zip(result.images, captions, strict=True)),
                status,
                gr.DownloadButton(value=str(paths[0]), interactive=True),
                [str(p) for p in paths],
                settings,
            )
        finally:  # Gradio has copied the files into its cache by the time the generator resumes
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def show_settings(settings: list, event: gr.SelectData):
        if not settings or event.index is None or event.index >= len(settings):
            return {"note": "settings appear once the images are ranked"}
        return settings[event.index]

    @staticmethod
    def random_seed() -> int:
        return random.randint(0, limits.MAX_SEED)


def build_app(
    pipe: Pipeline,
    output_root: Path,
    max_candidates: int = 64,
    batcher: Batcher | None = None,
    handlers: Generator | None = None,
) -> gr.Blocks:
    """The page: prompt and knobs on the left, gallery, downloads and settings on the right.
    With a `batcher`, concurrent requests share sampler batches."""
    handlers = handlers or Generator(pipe, output_root, batcher)
    config = pipe.model.config
    with gr.Blocks(title="DALL·E Mini", delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"# DALL·E Mini\nText to images, in JAX. Model: **{pipe.describe()}**")
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="a red circle on a blue background",
                    lines=2,
                    max_length=limits.MAX_PROMPT_CHARS,
                    elem_id="prompt",
                )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples(EXAMPLES, inputs=prompt, label="Examples")
                with gr.Accordion("Settings", open=True):
                    temperature = gr.Slider(
                        0.1,
                        3.0,
                        value=1.0,
                        step=0.05,
                        label="Temperature",
                        info="lower: safer, plainer; higher: more varied",
                        elem_id="temperature",
                    )
                    top_k = gr.Slider(
                        0,
                        config.num_codes,
                        value=min(config.top_k, config.num_codes),
                        step=1,
                        label="Top-k",
                        info="sample among the k likeliest codes; 0 = off",
                        elem_id="top-k",
                    )
                    top_p = gr.Slider(
                        0.05,
                        1.0,
                        value=1.0,
                        step=0.05,
                        label="Top-p",
                        info="sample among codes holding this probability; 1 = off",
                        elem_id="top-p",
                    )
                    condition_scale = gr.Slider(
                        1.0,
                        20.0,
                        value=pipe.model.config.condition_scale,
                        step=0.5,
                        label="Condition scale",
                        info="how strongly to follow the prompt",
                        elem_id="condition-scale",
                    )
                    num_candidates = gr.Slider(
                        NUM_IMAGES,
                        max_candidates,
                        value=min(DEFAULT_CANDIDATES, max_candidates),
                        step=1,
                        label="Candidates",
                        info="images sampled; CLIP keeps the best nine",
                        elem_id="candidates",
                    )
                    with gr.Row():
                        seed = gr.Number(
                            0,
                            precision=0,
                            minimum=0,
                            maximum=limits.MAX_SEED,
                            label="Seed",
                            elem_id="seed",
                            scale=3,
                        )
                        dice = gr.Button("Random seed", size="sm", elem_id="randomize", scale=1)
                gr.Markdown(NOTE)
            with gr.Column(scale=3, min_width=360):
                gallery = gr.Gallery(
                    label="Best first, CLIP score as caption",
                    columns=3,
                    rows=3,
                    height=740,
                    object_fit="contain",
                    format="png",
                    preview=False,
                    buttons=["download", "fullscreen"],
                    interactive=False,
                    elem_id="gallery",
                )
                status = gr.Markdown("", elem_id="status")
                chosen = gr.JSON(
                    label="Settings of the clicked image: pipe.regenerate(settings) gives it again",
                    open=True,
                    elem_id="settings",
                )
                grid_button = gr.DownloadButton(
                    "Download the grid", interactive=False, elem_id="download-grid"
                )
                files = gr.File(
                    label="Each image, the grid, and result.json (settings, scores)",
                    file_count="multiple",
                    interactive=False,
                    height=220,
                    elem_id="files",
                )
        settings_state = gr.State([])
        knobs = [prompt, temperature, top_k, top_p, condition_scale, num_candidates, seed]
        outputs = [gallery, status, grid_button, files, settings_state]
        # Raw payloads (preprocess=False): the pipeline checks every value itself, so a wrong type
        # sent through the API gets the same clear message as an out-of-range one.
        gr.on(
            [run.click, prompt.submit],
            handlers.generate,
            inputs=knobs,
            outputs=outputs,
            api_name="generate",
            preprocess=False,
            concurrency_id="generate",
        )
        gallery.select(
            handlers.show_settings,
            inputs=settings_state,
            outputs=chosen,
            api_visibility="private",
            queue=False,
        )
        dice.click(handlers.random_seed, outputs=seed, api_visibility="private", queue=False)
    return demo


def default_candidates(args) -> int:
    return min(DEFAULT_CANDIDATES, args.max_candidates)


def default_concurrency(args) -> int:
    """Handlers running at once: one without batching; with batching, enough requests for the
    batch being sampled and the next one (2 × batch rows / default candidates). More would only
    wait inside the batcher, where no place in line is shown and `--max-queue` does not count
    them: measured with 16 handlers, 32 visitors were all admitted and the last waited over
    90 s (docs/serving.md)."""
    if args.no_batching:
        return 1
    return 2 * max(1, args.batch_rows // default_candidates(args))


def default_host() -> str:
    """127.0.0.1 unless told otherwise; a Hugging Face Space (SPACE_ID set) listens on 0.0.0.0."""
    if os.environ.get("GRADIO_SERVER_NAME"):
        return os.environ["GRADIO_SERVER_NAME"]
    return "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the DALL·E Mini web app.")
    parser.add_argument(
        "--model",
        default=os.environ.get("DALLE_MINI_MODEL", "embedded"),
        help="'embedded' (default), 'mini', 'mega', or a folder with dallebart/, vqgan/ and clip/",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--host",
        default=default_host(),
        help="address to listen on (default 127.0.0.1; 0.0.0.0 on a Space)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests waiting beyond this are turned away (default 16)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests handled at once (default: 1 without batching; with batching, enough "
        "for two full batches of default-sized requests, 4 for 64 rows of 32 candidates)",
    )
    parser.add_argument(
        "--no-batching",
        action="store_true",
        help="sample each request alone, one at a time (the unbatched server, for comparison)",
    )
    parser.add_argument(
        "--batch-window",
        type=float,
        default=0.1,
        help="seconds to wait for more requests to join a batch (default 0.1)",
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=64,
        help="most candidates sampled in one shared batch (default 64: 2 requests of 32; "
        "larger batches measured slower per image on a 2-core CPU, docs/serving.md)",
    )
    parser.add_argument(
        "--max-candidates",
        type=int,
        default=64,
        help="largest number of candidates the slider offers (default 64)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip compiling the sampler before the first request",
    )
    return parser.parse_args(argv)


def serve(pipe: Pipeline, args: argparse.Namespace, output_root: Path):
    """The app as `main` serves it, not yet launched: (page, handlers, batcher or None).
    Gradio's queue holds `--max-queue` requests and runs `--concurrency` handlers at once."""
    concurrency = args.concurrency or default_concurrency(args)
    batcher = None
    if not args.no_batching:
        batcher = Batcher(pipe, window_s=args.batch_window, max_rows=args.batch_rows)
    handlers = Generator(pipe, output_root, batcher)
    demo = build_app(pipe, output_root, args.max_candidates, handlers=handlers)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=concurrency)
    return demo, handlers, batcher


def launch(demo: gr.Blocks, args: argparse.Namespace) -> None:
    """Starts serving in the background; only the files the app returns are reachable."""
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=[],
        show_error=False,
        css=CSS,
        footer_links=["api"],
        prevent_thread_lock=True,
    )


def main(argv=None) -> None:
    limit_allocator_arenas()  # before the server's threads allocate (docs/serving.md, soak)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.max_candidates < NUM_IMAGES:
        raise SystemExit(f"app.py: --max-candidates must be at least {NUM_IMAGES}")
    if args.batch_rows < 1 or args.batch_window < 0:
        raise SystemExit("app.py: --batch-rows must be at least 1 and --batch-window at least 0")
    try:
        pipe = Pipeline.from_pretrained(
            args.model, dtype=args.dtype, max_candidates=args.max_candidates
        )
    except ValueError as error:  # CheckpointError included: missing or mismatched files
        raise SystemExit(f"app.py: cannot load the model {args.model!r}: {error}") from None
    LOG.info("loaded %s", pipe.describe())
    if not args.no_warmup:  # compile every batch size a visitor can meet, so nobody waits for it
        candidates = default_candidates(args)
        warm_up(pipe, candidates, candidates if args.no_batching else args.batch_rows)
    output_root = Path(tempfile.mkdtemp(prefix="dalle-mini-app-"))
    demo, handlers, batcher = serve(pipe, args, output_root)
    try:
        launch(demo, args)
        wait_for_stop()
        LOG.info("stopping: finishing the requests in progress")
        if not handlers.drain(DRAIN_TIMEOUT_S):
            LOG.warning("requests still running after %d s; stopping anyway", DRAIN_TIMEOUT_S)
        if batcher is not None:
            batcher.close(timeout=1.0)
        LOG.info("requests in progress answered; closing the server")
        time.sleep(PUBLISH_GRACE_S)  # let the clients fetch the last images
    finally:
        demo.close()
        shutil.rmtree(output_root, ignore_errors=True)


if __name__ == "__main__":
    main()
