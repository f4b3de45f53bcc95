"""Open a file in a real headless Chromium (Debian's ``chromium``, driven by playwright),
offline, and record every request it makes: what the HTML report's tests look through.

Without Chromium or playwright the test is skipped, saying so; with
``DETAUDIT_REQUIRE_BROWSER=1`` (as CI sets) it fails instead, so a CI machine that lost
its browser cannot pass by skipping.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser() -> str:
    """The Chromium executable, or a skip (a failure under DETAUDIT_REQUIRE_BROWSER=1)."""
    executable = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    problem = None
    if executable is None:
        problem = "Chromium is not installed (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install -e '.[test]')"
    if problem is None:
        return executable
    if os.environ.get("DETAUDIT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"DETAUDIT_REQUIRE_BROWSER=1 but {problem}")
    pytest.skip(problem)


@dataclass
class Visit:
    page: object
    url: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    console_errors: list[str] = field(default_factory=list)


@contextmanager
def open_offline(path: Path, width: int = 1200, height: int = 900):
    """The page of ``path`` (file://), loaded with the network off: the context is
    offline and every request but the file itself is aborted (and recorded)."""
    executable = require_browser()
    from playwright.sync_api import sync_playwright

    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="detaudit-chromium-") as profile, \
            sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=FLAGS, offline=True,
            viewport={"width": width, "height": height})
        try:
            page = context.new_page()
            visit = Visit(page, url)
            page.on("console", lambda m: m.type == "error" and visit.console_errors.append(m.text))
            context.on("request", lambda r: visit.requests.append(r.url))

            def only_the_file(route):
                if route.request.url == url:
                    route.continue_()
                else:
                    route.abort()

            context.route("**/*", only_the_file)
            page.goto(url, wait_until="load")
            yield visit
        finally:
            context.close()


def blank(png: bytes) -> bool:
    """A picture of one colour (or nearly): nothing was drawn."""
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    return float(np.std(pixels)) < 0.02 or float((pixels.mean(axis=2) < 0.9).mean()) < 0.005
