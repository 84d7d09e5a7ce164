"""Shared test setup: no network; fixtures are outputs of the original implementation."""

import os
from pathlib import Path

import pytest

# Tests never reach a hub: a loader that tries fails fast with its "not in the cache" error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES
