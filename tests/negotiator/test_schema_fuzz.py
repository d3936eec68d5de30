"""Schema fuzzing (issue 6, hardening 1): schemathesis against `/api/v1/openapi.json`, in-process.

Every operation of the published schema gets a bounded, deterministic number of generated requests
(valid and invalid) through the ASGI application itself (`negotiator.asgi.application`, no server).
Each response must not be a 5xx and must match what the schema documents for it: the status code,
the content type, the body schema and the documented headers (schemathesis's built-in checks).

The generate endpoint runs against a fake upstream in its own process (schemathesis drives the
application from its own event-loop thread), so generated valid bodies get real 200s (JSON and
`text/event-stream`), and the provider-down paths (degraded health, 503) get their own cases.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llm.local_model import free_port
from tests import servers

SCHEMA_PATH = "/api/v1/openapi.json"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES = 50  # per operation and phase; derandomized, so every run sends the same requests


@pytest.fixture(scope="module")
def upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """tests/fake_upstream.py in its own process: a healthy OpenAI-compatible server, 20 tokens a reply."""
    with servers.fake_upstream(tmp_path_factory.mktemp("fuzz-upstream"), "--tokens", "20") as url:
        yield url


def load_schema() -> schemathesis.BaseSchema:
    """The schema as the application serves it at /api/v1/openapi.json, bound to the whole ASGI app.

    It is fetched at collection through Django's own ASGI handler: the full application would run
    its start-up work (a database query) on its first request, which must wait for the test database.
    """
    from negotiator.asgi import application, django_asgi_app

    loaded = schemathesis.openapi.from_asgi(SCHEMA_PATH, django_asgi_app)
    loaded.app = application  # every generated request goes through HTTP routing and middleware
    return loaded


schema = load_schema()


@pytest.fixture
def fuzz_upstream(upstream_url: str, llm_config: Callable[..., dict[str, Any]]) -> str:
    llm_config(lm_studio={"base_url": upstream_url, "default_model": ""})
    return upstream_url


@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@pytest.mark.django_db(transaction=True)
def test_every_operation_answers_as_documented(case: schemathesis.Case, fuzz_upstream: str) -> None:
    try:
        r = case.call_and_validate()
    except BaseException as e:
        import json as _j
        print("FAILBODY", case.operation.label, case.path_parameters, case.query, _j.dumps(case.body, default=repr)[:600] if not isinstance(case.body, bytes) else case.body[:100], case.meta.phase.name.value if case.meta else None)
        raise
    import collections, json as _j
    STATS[(case.operation.label, case.meta.phase.name.value if case.meta else None, r.status_code, r.headers.get("content-type", [""])[0][:20])] += 1
    if "generate" in case.operation.label and (r.status_code in (400,) or (isinstance(case.body, dict) and case.body.get("stream"))):
        print("BODY", repr(case.body)[:200], r.content[:200])


import collections
STATS = collections.Counter()
def teardown_module():
    for k, v in sorted(STATS.items(), key=str): print(k, v)
