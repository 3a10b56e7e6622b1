"""Debian's Chromium driven by Playwright: the browser whose own `EventSource` the tests use."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright `Browser`), closed on exit. Chromium must be there:
    `make test` installs it (scripts/ensure-system-deps.sh), so its absence is a failure."""
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is absent: run scripts/ensure-system-deps.sh"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()
