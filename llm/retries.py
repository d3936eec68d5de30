"""When to try an upstream request again, and how long to wait first."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for; `None` if unusable.

    The header holds delta-seconds or an HTTP date.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds == float("inf"):  # NaN or infinite
        return None
    return max(0.0, seconds)


# A generator of its own: the process-wide one is seeded by whoever uses it (hypothesis, in tests).
_jitter = random.Random()


def backoff_delay(attempt: int, base: float, *, rng: random.Random | None = None) -> float:
    """`base * 2**attempt` with equal jitter: half fixed, half random, so clients spread out."""
    ceiling = base * (2**attempt)
    return ceiling / 2 + (rng or _jitter).uniform(0, ceiling / 2)
