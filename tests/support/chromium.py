"""Headless Chromium driven by Playwright (the PyPI ``playwright`` package).

The browser is the system one (the Debian package ``chromium``; ``make test`` installs it
when missing), passed to Playwright as ``executable_path``: no browser is downloaded and
``playwright install`` is never needed. Fresh profile per launch, no network features,
loopback only.
"""

from __future__ import annotations

import contextlib
import shutil
from typing import Any, Iterator

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--disable-extensions",
         "--metrics-recording-only", "--no-default-browser-check"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def page(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A Playwright ``Page`` of the system Chromium, headless, with a ``dialogs`` list of
    every JavaScript dialog that opened (each is dismissed)."""
    from playwright.sync_api import sync_playwright

    exe = find_chromium()
    if exe is None:
        raise RuntimeError("chromium not found: `make test` installs it "
                           "(apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        try:
            pg = browser.new_page(viewport={"width": width, "height": height},
                                  device_scale_factor=1)
            pg.dialogs = []

            def on_dialog(d: Any) -> None:
                pg.dialogs.append(d.message)
                d.dismiss()

            pg.on("dialog", on_dialog)
            yield pg
        finally:
            browser.close()
