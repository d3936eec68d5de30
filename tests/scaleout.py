"""What the scale-out tests share: the real PostgreSQL and Redis they run on (the machine's own,
or `SCALEOUT_DATABASE_URL` / `SCALEOUT_REDIS_URL`), checked once before a cluster starts."""

from __future__ import annotations

import os

import psycopg
import pytest
import redis

PG_URL = os.environ.get("SCALEOUT_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SCALEOUT_REDIS_URL", "redis://127.0.0.1:6379/0")


def admin_connection() -> psycopg.Connection:
    """An autocommit connection to PostgreSQL (to create and drop the clusters' databases), once
    Redis answers too; if either does not, the test fails saying how to start them."""
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        pytest.fail(
            f"The scale-out tests need PostgreSQL at {PG_URL} and Redis at {REDIS_URL} ({exc}). "
            "Start them (.ci/run does), or run `make test PYTEST_ARGS=\"-m 'not scaleout'\"`."
        )
    return admin
