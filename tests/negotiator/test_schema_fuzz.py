"""Schema fuzzing (issue 6, hardening 1): schemathesis against `/api/v1/openapi.json`, in-process.

Every operation the published schema lists gets a bounded, deterministic set of generated requests
(schemathesis's examples, coverage and fuzzing phases, valid and invalid data, wrong methods) sent
through the ASGI application itself (`negotiator.asgi.application`, no server). Each response must
not be a 5xx and must be what the schema documents for it: a documented status code, a documented
content type, a body matching the documented schema (for `text/event-stream`, each event), and a
schema-valid request is not refused as invalid.

The generate endpoint runs against the fake upstream (`testkit/fake_upstream.py`) in its own
process: schemathesis drives the application from its own event-loop thread, so an in-loop fake
would not do.
Generated valid bodies thus get real 200s, in JSON and as SSE. The paths a generator rarely reaches
(an existing session, the provider down, the database down, `API_TOKEN` set, an oversized body, the
inputs found failing) get explicit cases, validated by the same checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from django.db import OperationalError
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llm.local_model import free_port
from testkit import servers

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # Negotiations the fuzzer starts go on in the background while it draws the next case, and
    # channels' in-memory layer names channels with the random module: hypothesis sees it used.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
]

SCHEMA_PATH = "/api/v1/openapi.json"
GENERATE = "/api/v1/llm/generate"
SESSIONS = "/api/v1/sessions"
SESSION = "/api/v1/sessions/{session_id}"
HEALTH = "/api/v1/health"
STATUS = "/api/v1/llm/status"
HELLO = [{"role": "user", "content": "Hello"}]


def not_a_server_error_but_off_schema_output(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except the one the contract asks for when a generated `response_format` schema is
    one the fake upstream's prose cannot follow: 502 `LLM_INVALID_OUTPUT` (its body, like every
    documented 5xx, is still checked by the other checks)."""
    if (
        response.status_code == 502
        and isinstance(case.body, dict)
        and case.body.get("response_format") is not None
    ):
        try:
            code = json.loads(response.content)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if code == "LLM_INVALID_OUTPUT":
            return None
    return not_a_server_error(ctx, response, case)


# The documented response: no 5xx, status, content type, body (each SSE event), headers.
CONFORMANCE = [
    not_a_server_error_but_off_schema_output,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# ...and a request the schema documents as valid is not refused as invalid (4xx other than
# 401/403/404/409/429). It only judges cases the generator made as schema-valid.
CHECKS = [*CONFORMANCE, positive_data_acceptance]
# SSE responses whose frames the explicit tests read themselves: the published per-event schema is
# judged once, by `test_sse_events_match_the_documented_event_schema`, not by every SSE test.
SSE_CHECKS = [check for check in CONFORMANCE if check is not response_schema_conformance]
# Where the contract itself answers 502/503 (the provider or the database down), the status must be
# a documented one with its documented body, but is not a server error.
DOCUMENTED_5XX = [
    check for check in CONFORMANCE if check is not not_a_server_error_but_off_schema_output
]
SSE_DOCUMENTED_5XX = [
    check for check in SSE_CHECKS if check is not not_a_server_error_but_off_schema_output
]

EXAMPLES = 50  # per operation and phase


def load_schema() -> schemathesis.BaseSchema:
    """The schema as the application serves it at /api/v1/openapi.json, bound to the whole ASGI app.

    It is fetched at collection through Django's ASGI handler alone: the full application runs its
    start-up work (a database query) on its first call, which must wait for the test database.
    """
    from negotiator.asgi import application, django_asgi_app

    loaded = schemathesis.openapi.from_asgi(SCHEMA_PATH, django_asgi_app)
    loaded.app = application  # every request goes through the real routing, middleware and start-up
    return loaded


schema = load_schema()


@pytest.fixture(scope="module")
def upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """testkit/fake_upstream.py in its own process.

    A healthy OpenAI-compatible server, 20 tokens a reply.
    """
    with servers.fake_upstream(tmp_path_factory.mktemp("fuzz-upstream"), "--tokens", "20") as url:
        yield url


@pytest.fixture(autouse=True)
def _close_app_connections() -> Iterator[None]:
    """The application ran in schemathesis's event-loop thread: close the database connections it
    opened there (PostgreSQL refuses to drop a test database that still has one)."""
    yield
    from asgiref.sync import sync_to_async
    from django.db import connections
    from schemathesis.python import asgi

    if asgi._PORTAL is not None:
        asgi._PORTAL.call(sync_to_async(connections.close_all))


@pytest.fixture
def healthy(upstream_url: str, llm_config: Callable[..., dict[str, Any]]) -> str:
    """The lm_studio provider pointed at the fake upstream; its first listed model is used."""
    llm_config(lm_studio={"base_url": upstream_url, "default_model": ""})
    return upstream_url


@pytest.fixture
def provider_down(llm_config: Callable[..., dict[str, Any]]) -> str:
    """The lm_studio provider pointed at a port where nothing listens, without retries."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    llm_config(lm_studio={"base_url": url, "default_model": ""}, max_retries=0)
    return url


# The fuzzer -------------------------------------------------------------------------------------


@pytest.mark.slow
@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same requests on every run
    deadline=None,
    database=None,  # no example database: a run never depends on an earlier one
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: schemathesis.Case, healthy: str) -> None:
    case.call_and_validate(checks=CHECKS)


# Explicit cases -----------------------------------------------------------------------------------


def call(path: str, method: str = "GET", *, checks: list[Any] = CONFORMANCE, **parts: Any) -> Any:
    """One request built from the schema's operation, sent in-process and validated by `checks`."""
    case = schema[path][method].Case(**parts)
    if "body" in parts:
        case.media_type = "application/json"
    return case.call_and_validate(checks=checks)


def sse_frames(response: Any) -> list[dict[str, Any]]:
    body = response.content.decode()
    return [
        json.loads(line[len("data: ") :]) for line in body.split("\n") if line.startswith("data: ")
    ]


def test_json_and_sse_replies_and_the_sessions_they_store(healthy: str) -> None:
    reply = call(
        GENERATE, "POST", body={"messages": HELLO, "max_tokens": 64, "temperature": 0.5}
    ).json()
    assert reply["finish_reason"] == "stop" and reply["content"], reply

    streamed = call(GENERATE, "POST", checks=SSE_CHECKS, body={"messages": HELLO, "stream": True})
    assert streamed.headers["content-type"][0].startswith("text/event-stream")
    frames = sse_frames(streamed)
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "done", frames
    assert {f["type"] for f in frames[1:-1]} == {"token"}, frames

    continued = call(
        GENERATE, "POST", body={"messages": HELLO, "session_id": reply["session_id"]}
    ).json()
    assert continued["session_id"] == reply["session_id"]

    detail = call(SESSION, path_parameters={"session_id": reply["session_id"]}).json()
    assert len(detail["messages"]) == 4 and detail["status"] == "completed", detail
    listed = call(
        SESSIONS, query={"status": "completed", "provider": "lm_studio", "page_size": 1}
    ).json()
    assert listed["count"] == 2 and len(listed["items"]) == 1, listed
    for query in ({"page": 2, "page_size": 1}, {"page": 99}, {"model": "no-such-model"}):
        call(SESSIONS, query=query)


def test_sse_events_match_the_documented_event_schema(healthy: str) -> None:
    """Each SSE event of `stream: true` must match the schema documented for `text/event-stream`.

    schemathesis (as OpenAPI 3.2's `itemSchema`) reads that schema as the shape of one event,
    `{"data": "<frame JSON>", "event": "message", ...}`.
    """
    response = call(
        GENERATE,
        "POST",
        checks=[response_schema_conformance],
        body={"messages": HELLO, "stream": True},
    )
    assert sse_frames(response)[-1]["type"] == "done"


def test_failed_sessions_read_back_as_documented(provider_down: str) -> None:
    failed = call(GENERATE, "POST", checks=DOCUMENTED_5XX, body={"messages": HELLO})
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "LLM_UNAVAILABLE"
    streamed = call(GENERATE, "POST", checks=SSE_CHECKS, body={"messages": HELLO, "stream": True})
    assert streamed.status_code == 200
    frames = sse_frames(streamed)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "LLM_UNAVAILABLE", frames

    listed = call(SESSIONS, query={"status": "failed"}).json()
    assert listed["count"] >= 1, listed
    for item in listed["items"]:
        assert item["error"]["code"] == "LLM_UNAVAILABLE", item
        call(SESSION, path_parameters={"session_id": item["id"]})


def test_provider_down_health_and_status_as_documented(provider_down: str) -> None:
    health = call(HEALTH, checks=DOCUMENTED_5XX).json()
    assert health["status"] == "degraded", health
    status = call(STATUS, checks=DOCUMENTED_5XX).json()
    assert status["reachable"] is False and status["error"]["code"] == "LLM_UNAVAILABLE", status


def test_database_down_health_is_503_as_documented(
    healthy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from health import probes

    def refuse(alias: str) -> None:
        raise OperationalError("connection refused (simulated)")

    monkeypatch.setattr(probes, "_select_one", refuse)
    response = call(HEALTH, checks=DOCUMENTED_5XX)
    assert response.status_code == 503 and response.json()["status"] == "unhealthy", (
        response.content
    )
    call(STATUS)  # the status page reports the database error in its body, still 200


def test_api_token_refusals_are_documented(healthy: str, settings: Any) -> None:
    settings.API_TOKEN = "fuzz-api-token"
    for response in (
        call(GENERATE, "POST", body={"messages": HELLO}),
        call(SESSIONS),
        call(SESSION, path_parameters={"session_id": "6f1f8e4e-0000-4000-8000-000000000000"}),
    ):
        assert response.status_code == 401 and response.json()["error"]["code"] == "UNAUTHORIZED"
    allowed = call(SESSIONS, headers={"Authorization": "Bearer fuzz-api-token"})
    assert allowed.status_code == 200


def test_oversized_and_malformed_bodies_are_documented_errors(healthy: str, settings: Any) -> None:
    settings.LLM_MAX_REQUEST_BYTES = 1024
    big = call(GENERATE, "POST", body={"messages": [{"role": "user", "content": "x" * 4096}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "MESSAGE_TOO_LARGE"
    unknown = call(
        GENERATE,
        "POST",
        body={"messages": HELLO, "session_id": "6f1f8e4e-0000-4000-8000-000000000000"},
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "SESSION_NOT_FOUND"
    streamed_unknown = call(
        GENERATE,
        "POST",
        body={
            "messages": HELLO,
            "stream": True,
            "session_id": "6f1f8e4e-0000-4000-8000-000000000000",
        },
    )
    assert streamed_unknown.status_code == 404


# Inputs found failing (each a 500 when these tests were written) ----------------------------------


@pytest.mark.parametrize("page", [2**63 - 1, 2**63, 3633870635147852775424])
def test_a_huge_page_number_is_not_a_server_error(healthy: str, page: int) -> None:
    """`page` is documented as an integer >= 1 with no maximum.

    Any such page is an empty page (or a documented 422), never a 500 (the OFFSET overflowed
    SQLite's and PostgreSQL's 64-bit integers).
    """
    call(SESSIONS, query={"page": page})


@pytest.mark.parametrize("query", [{"provider": "a\x00b"}, {"model": "\x00"}])
def test_nul_in_a_filter_is_not_a_server_error(healthy: str, query: dict[str, str]) -> None:
    """PostgreSQL text cannot hold NUL: the filter must not reach the database as a 500."""
    call(SESSIONS, query=query)


@pytest.mark.parametrize("stream", [False, True])
def test_nul_in_a_message_is_not_a_server_error(healthy: str, stream: bool) -> None:
    """A NUL in the conversation is valid JSON and a valid string: a reply or a 4xx, never a 500
    (nor, streaming, an INTERNAL_ERROR frame); PostgreSQL cannot store it as it is."""
    response = call(
        GENERATE,
        "POST",
        checks=SSE_CHECKS if stream else CONFORMANCE,
        body={"messages": [{"role": "user", "content": "a\x00b"}], "stream": stream},
    )
    if stream:
        assert all(frame.get("code") != "INTERNAL_ERROR" for frame in sse_frames(response)), (
            response.content
        )


def test_the_published_request_schema_bounds_what_the_server_refuses(healthy: str) -> None:
    """What the server refuses as INVALID_REQUEST, the published schema must reject too: clients
    generate their code and validation from it (schemathesis's positive_data_acceptance)."""
    body_schema = schema.raw_schema["components"]["schemas"]["GenerateIn"]
    validator = jsonschema_rs.validator_for(
        {**body_schema, "components": schema.raw_schema["components"]}
    )
    refused = []
    for temperature in (-1, 2.5, 1000):
        body = {"messages": HELLO, "temperature": temperature}
        response = call(GENERATE, "POST", body=body)
        assert response.status_code == 422, response.content
        if validator.is_valid(body):
            refused.append(temperature)
    assert not refused, (
        f"the schema documents temperature={refused} as valid; the server answers 422"
    )
