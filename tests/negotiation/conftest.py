"""Fixtures shared by the negotiation tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from negotiation.runner import stop_all


@pytest.fixture
async def no_run_left(close_clients: None) -> AsyncIterator[None]:
    """Whatever a test leaves running is stopped before the providers and the database go (a run
    left behind would outlive its event loop, and wait in the next test's `stop_all`)."""
    yield
    await stop_all(timeout=5)
