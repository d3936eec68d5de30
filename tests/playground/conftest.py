"""What the playground's browser tests share: Debian's Chromium under Playwright, one browser per
module and a fresh context (cookies, sessionStorage) per test.

Modules that use these fixtures skip themselves when Chromium is missing (`CHROMIUM` below);
Playwright is imported only when a browser is launched, so collecting them needs no browser.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
SKIP_REASON = (
    f"Chromium not found at {CHROMIUM}: "
    "install it (`apt-get install -y chromium`, as .ci/run does) "
    "or set CHROMIUM_PATH, then run `make test PYTEST_ARGS='-m browser'`"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(20_000)
    page = context.new_page()
    yield page
    context.close()
