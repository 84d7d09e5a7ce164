"""The persistent compilation cache: a second process reuses what the first one compiled."""

import json
import subprocess
import sys
import textwrap

import pytest

from dalle_mini import compile_cache

# A child process: enables the cache, compiles a function whose compilation takes a noticeable
# time (many unrolled steps), runs it, and reports JAX's cache-hit events and the compile time.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp
    from dalle_mini.compile_cache import enable_compile_cache

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kwargs: hits.append(event) if event.endswith("cache_hits") else None
    )
    enable_compile_cache(sys.argv[1], min_compile_time_secs=0.0)

    def many_steps(x):
        for i in range(60):
            x = jnp.tanh(x @ x.T + i) * jnp.cos(x)
        return x

    start = time.perf_counter()
    compiled = jax.jit(many_steps).lower(jnp.ones((8, 8))).compile()
    seconds = time.perf_counter() - start
    compiled(jnp.ones((8, 8))).block_until_ready()
    print(json.dumps({"hits": len(hits), "compile_seconds": seconds}))
    """
)


def _run_child(cache_dir):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_compiled_function(tmp_path):
    cache_dir = tmp_path / "cache"
    first = _run_child(cache_dir)
    assert first["hits"] == 0
    entries = [path for path in cache_dir.iterdir() if not path.name.startswith(".")]
    assert entries, "the first process wrote nothing to the cache"
    second = _run_child(cache_dir)
    assert second["hits"] >= 1
    assert second["compile_seconds"] < first["compile_seconds"]


def test_environment_variable_picks_or_disables_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "from-env"))
    assert compile_cache.default_cache_dir() == tmp_path / "from-env"
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.default_cache_dir() is None
    assert compile_cache.enable_compile_cache() is None


def test_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="a-file"):
        compile_cache.enable_compile_cache(blocker / "cache")
