"""Retry timing (`llm/retries.py`): the `Retry-After` header and exponential backoff with jitter."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from llm.retries import RETRY_STATUSES, backoff_delay, parse_retry_after

NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)


def http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


# parse_retry_after -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("1.5", 1.5), ("0", 0.0), (" 12 ", 12.0), ("120", 120.0)],
)
def test_parse_retry_after_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == pytest.approx(seconds)


def test_parse_retry_after_seconds_ignores_now() -> None:
    assert parse_retry_after("7", now=NOW) == 7.0


def test_parse_retry_after_http_date() -> None:
    header = http_date(NOW + timedelta(seconds=30))
    assert header == "Fri, 14 Mar 2025 12:00:30 GMT"
    assert parse_retry_after(header, now=NOW) == pytest.approx(30.0)


def test_parse_retry_after_http_date_literal() -> None:
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == pytest.approx(60.0)


def test_parse_retry_after_http_date_far_ahead() -> None:
    header = http_date(NOW + timedelta(hours=1))
    assert parse_retry_after(header, now=NOW) == pytest.approx(3600.0)


def test_parse_retry_after_http_date_uses_the_clock_by_default() -> None:
    header = http_date(datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=20))
    seconds = parse_retry_after(header)
    assert seconds is not None
    assert 17 <= seconds <= 20


@pytest.mark.parametrize("ago", [timedelta(seconds=1), timedelta(minutes=5), timedelta(days=400)])
def test_parse_retry_after_past_date_is_zero(ago: timedelta) -> None:
    assert parse_retry_after(http_date(NOW - ago), now=NOW) == 0


def test_parse_retry_after_now_is_zero() -> None:
    assert parse_retry_after(http_date(NOW), now=NOW) == 0


@pytest.mark.parametrize("header", ["-5", "-0.5", "-inf"])
def test_parse_retry_after_negative_seconds_is_never_negative(header: str) -> None:
    seconds = parse_retry_after(header)
    assert seconds is None or seconds == 0


@pytest.mark.parametrize(
    "header",
    ["soon", "abc", "7 seconds", "Fri, 99 Foo 2025 99:99:99 GMT", "nan", "inf", "1e999", "NaN"],
)
def test_parse_retry_after_garbage_is_none(header: str) -> None:
    assert parse_retry_after(header, now=NOW) is None


@pytest.mark.parametrize("header", [None, "", "   "])
def test_parse_retry_after_missing_is_none(header: str | None) -> None:
    assert parse_retry_after(header) is None


def test_retry_statuses() -> None:
    for status in (408, 429, 500, 502, 503, 504, 599):
        assert status in RETRY_STATUSES
    for status in (200, 400, 401, 403, 404, 409, 413, 422, 600):
        assert status not in RETRY_STATUSES


# backoff_delay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("attempt", range(6))
def test_backoff_delay_within_equal_jitter_bounds(attempt: int, base: float) -> None:
    rng = random.Random(attempt * 100 + int(base * 10))
    ceiling = base * 2**attempt
    for _ in range(200):
        delay = backoff_delay(attempt, base, rng=rng)
        assert ceiling / 2 <= delay <= ceiling


def test_backoff_delay_uses_the_given_rng() -> None:
    first = [backoff_delay(3, 1.0, rng=random.Random(42)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng = random.Random(7)
    delays = {backoff_delay(3, 1.0, rng=rng) for _ in range(50)}
    assert len(delays) > 40, "jitter: the delays must spread out, not repeat one value"


def test_backoff_delay_jitter_covers_the_range() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(4, 1.0, rng=rng) for _ in range(2000)]
    assert min(delays) < 8 + 0.5  # near the floor of 16 / 2
    assert max(delays) > 16 - 0.5  # near the ceiling of 16


def test_backoff_delay_grows_exponentially() -> None:
    rng = random.Random(2024)
    base = 2.0
    means = []
    for attempt in range(6):
        samples = [backoff_delay(attempt, base, rng=rng) for _ in range(400)]
        means.append(sum(samples) / len(samples))
    # Equal jitter: the mean is 3/4 of base * 2**attempt, so each step doubles it.
    for attempt, mean in enumerate(means):
        assert mean == pytest.approx(0.75 * base * 2**attempt, rel=0.05)
    for lower, higher in itertools.pairwise(means):
        assert higher / lower == pytest.approx(2.0, rel=0.1)
    # And every delay of one attempt is at least every delay of the one before.
    for attempt in range(5):
        worst_now = max(backoff_delay(attempt, base, rng=random.Random(s)) for s in range(50))
        best_next = min(backoff_delay(attempt + 1, base, rng=random.Random(s)) for s in range(50))
        assert best_next >= worst_now


def test_backoff_delay_zero_base_is_zero() -> None:
    assert all(backoff_delay(a, 0, rng=random.Random(a)) == 0 for a in range(6))


def test_backoff_delay_without_rng_uses_module_random() -> None:
    for attempt in range(4):
        delay = backoff_delay(attempt, 1.0)
        assert 2**attempt / 2 <= delay <= 2**attempt
