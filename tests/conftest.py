"""Shared fixtures: real servers on 127.0.0.1 port 0, handed to tests as URLs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests and bench scripts import the servers as ``tests.servers...``: the repo root
# must be importable however pytest was started.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.servers.fake_openai import FakeOpenAI  # noqa: E402


@pytest.fixture
def fake_openai():
    """A fake OpenAI-compatible server: ``.url``, ``.configure(...)``, ``.sent``, ``.received``."""
    with FakeOpenAI() as server:
        yield server
