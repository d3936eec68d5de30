"""Shared fixtures: LLM settings pointed at fake or real upstreams, and the real SmolLM2 server."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llm.providers import providers

UPSTREAM = "http://upstream.test/v1"
OPENROUTER = "http://openrouter.test/api/v1"
OPENROUTER_KEY = "sk-or-v1-TESTKEY-0123456789abcdef"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The SQLite test database in a file, as in production, not in memory: in a shared-cache
    memory database a second writer (a background negotiation's thread while a request writes in
    its own) fails at once with "database table is locked" instead of waiting its turn."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        database.setdefault("TEST", {})["NAME"] = str(
            tmp_path_factory.mktemp("database") / "test.sqlite3"
        )


@pytest.fixture(autouse=True)
def _fresh_providers() -> Iterator[None]:
    providers.reset()
    yield
    providers.reset()


@pytest.fixture(autouse=True)
def _open_api(settings: Any) -> None:
    """No rate limit and no API token unless a test sets them (they have tests of their own)."""
    settings.LLM_RATE_LIMIT = "off"
    settings.API_TOKEN = ""


@pytest.fixture
async def close_clients(llm_config: Callable[..., dict[str, Any]]) -> Any:
    """After the test: close the providers' pooled clients on its event loop (no unclosed sockets)
    and the database connections async code opened in its thread. Depends on `llm_config` so it
    runs before the settings are restored (which drops the providers)."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    yield
    await providers.aclose()
    await sync_to_async(connections.close_all)()


@pytest.fixture
def llm_config(settings: Any) -> Callable[..., dict[str, Any]]:
    """Point both providers at fake hosts with instant retries; call it again to change options.

    `llm_config(provider="openrouter", max_retries=1, lm_studio={"default_model": ""})`:
    keyword options go to DEFAULTS, `lm_studio` / `openrouter` dicts to that provider's CONFIG.
    """
    base = copy.deepcopy(settings.LLM)
    base["PROVIDER"] = "lm_studio"
    base["FALLBACK_PROVIDERS"] = []
    base["LOCAL_MODEL"] = "off"
    base["PROVIDERS"]["lm_studio"]["CONFIG"].update(
        base_url=UPSTREAM, default_model="test-model", read_timeout=5
    )
    base["PROVIDERS"]["openrouter"]["CONFIG"].update(
        base_url=OPENROUTER,
        default_model="openrouter/auto",
        api_key=OPENROUTER_KEY,
        enabled=True,
        read_timeout=5,
    )
    base["DEFAULTS"].update(
        connect_timeout=2,
        idle_timeout=5,
        ping_timeout=2,
        max_retries=3,
        retry_delay=0,
        retry_after_max=60,
        max_tokens=64,
    )

    def configure(
        provider: str | None = None,
        fallbacks: list[str] | None = None,
        lm_studio: dict[str, Any] | None = None,
        openrouter: dict[str, Any] | None = None,
        **defaults: Any,
    ) -> dict[str, Any]:
        conf = copy.deepcopy(base)
        if provider is not None:
            conf["PROVIDER"] = provider
        if fallbacks is not None:
            conf["FALLBACK_PROVIDERS"] = fallbacks
        conf["PROVIDERS"]["lm_studio"]["CONFIG"].update(lm_studio or {})
        conf["PROVIDERS"]["openrouter"]["CONFIG"].update(openrouter or {})
        conf["DEFAULTS"].update(defaults)
        settings.LLM = conf
        return conf

    configure()
    return configure


@pytest.fixture(scope="session")
def smollm2_server() -> Iterator[str]:
    """The real bundled SmolLM2-135M-Instruct, served by llama-cpp-python on a random port."""
    from llm.local_model import LocalModelServer

    server = LocalModelServer()
    server.start(ready_timeout=180)
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.fixture
def smollm2(smollm2_server: str, llm_config: Callable[..., dict[str, Any]]) -> str:
    """LLM settings pointed at the real SmolLM2 server.

    Its first listed model, as in production.
    """
    llm_config(
        lm_studio={"base_url": smollm2_server, "default_model": "", "read_timeout": 30},
        idle_timeout=30,
        max_tokens=48,
    )
    return smollm2_server


@pytest.fixture
async def upstream(llm_config: Callable[..., dict[str, Any]]) -> Any:
    """A real-socket fake upstream, selected as the lm_studio provider.

    See testkit/fake_upstream.py.
    """
    from testkit.fake_upstream import FakeUpstream

    fake = FakeUpstream()
    url = await fake.start()
    llm_config(lm_studio={"base_url": url, "default_model": ""})
    yield fake
    await fake.stop()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker uses a Redis database of its own (cache and channel layer
    for this process, another for the scale-out tests' servers): `cache.clear()` is Redis's
    FLUSHDB, which a key prefix does not fence, so one worker's clear once reset another's rate
    limit count mid-test (CI, PostgreSQL + Redis pass)."""
    import os

    from django.conf import settings

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return
    number = int(worker[2:])
    if settings.REDIS_URL:
        own = _redis_database(settings.REDIS_URL, 1 + number)
        settings.REDIS_URL = os.environ["REDIS_URL"] = own
        settings.CACHES["default"]["LOCATION"] = own
        settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [own]
    scaleout = os.environ.get("SCALEOUT_REDIS_URL", "redis://127.0.0.1:6379/0")
    os.environ["SCALEOUT_REDIS_URL"] = _redis_database(scaleout, 8 + number)


def _redis_database(url: str, offset: int) -> str:
    """`url` with its database number moved by `offset` (Redis has 16: 0 to 15)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    base = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(base + offset) % 16}"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2`), the tests that use the bundled model (and the browser tests,
    which do too) run on one worker: one model server per run, as without xdist."""
    for item in items:
        if item.get_closest_marker("smollm2") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.xdist_group("bundled-model"))
