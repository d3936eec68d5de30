"""`GET /` (name, version, docs link) and the OpenAPI docs.

At `/api/v1/docs` / `/api/v1/openapi.json`.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import AsyncClient, Client

from negotiator import __version__


@pytest.fixture
def schema() -> dict[str, Any]:
    response = Client().get("/api/v1/openapi.json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    return response.json()


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow one `$ref` into `components/schemas`."""
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/components/schemas/"), ref
    return schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def ref_name(node: dict[str, Any]) -> str:
    return node["$ref"].rsplit("/", 1)[-1]


# GET / --------------------------------------------------------------------------------------


async def test_root_names_the_service_its_version_and_docs() -> None:
    response = await AsyncClient().get("/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert body == {
        "name": "negotiator",
        "version": __version__,
        "docs": "/api/v1/docs",
        "playground": "/playground/",
        "negotiations_playground": "/playground/negotiations/",
    }
    assert isinstance(body["version"], str) and body["version"]


async def test_root_docs_link_points_at_the_rendered_docs() -> None:
    client = AsyncClient()
    docs = (await client.get("/")).json()["docs"]
    response = await client.get(docs)
    assert response.status_code == 200


# /api/v1/docs --------------------------------------------------------------------------------


def test_docs_page_renders_html_that_loads_the_schema() -> None:
    response = Client().get("/api/v1/docs")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert "<html" in html.lower()
    assert "openapi.json" in html


# /api/v1/openapi.json ------------------------------------------------------------------------


def test_schema_describes_the_api(schema: dict[str, Any]) -> None:
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["version"] == __version__
    assert schema["info"]["title"]
    # The error body is documented for readers of the docs.
    assert '{"error": {"code"' in schema["info"]["description"]


def test_schema_lists_every_endpoint_with_its_method(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    assert "post" in paths["/api/v1/llm/generate"]
    assert "get" in paths["/api/v1/health"]
    assert "get" in paths["/api/v1/llm/status"]
    for path, method in (
        ("/api/v1/llm/generate", "post"),
        ("/api/v1/health", "get"),
        ("/api/v1/llm/status", "get"),
    ):
        operation = paths[path][method]
        assert operation.get("summary"), path
        assert operation.get("description"), path


def test_generate_request_schema(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/api/v1/llm/generate"]["post"]
    body = operation["requestBody"]
    assert body["required"] is True
    request = resolve(schema, body["content"]["application/json"]["schema"])
    props = request["properties"]
    assert set(props) >= {"messages", "model", "max_tokens", "temperature", "session_id", "stream"}
    assert request["required"] == ["messages"]
    assert props["messages"]["minItems"] == 1
    assert props["stream"]["type"] == "boolean"
    assert props["stream"]["default"] is False
    message = resolve(schema, props["messages"]["items"])
    assert message["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    assert message["properties"]["content"]["type"] == "string"
    assert set(message["required"]) == {"role", "content"}
    # Unknown fields are refused, and the docs say so.
    assert request.get("additionalProperties") is False


def test_generate_request_has_an_example(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/api/v1/llm/generate"]["post"]["requestBody"]["content"][
        "application/json"
    ]
    request = resolve(schema, body["schema"])
    examples = request.get("examples") or ([body["example"]] if "example" in body else [])
    examples += list((body.get("examples") or {}).values())
    assert examples, "the generate request schema has no example"
    example = examples[0]
    example = example.get("value", example)
    assert example["messages"][0]["role"] in ("system", "user", "assistant")
    assert isinstance(example["messages"][0]["content"], str)


def test_generate_response_schemas(schema: dict[str, Any]) -> None:
    responses = schema["paths"]["/api/v1/llm/generate"]["post"]["responses"]
    ok = responses["200"]["content"]
    reply = resolve(schema, ok["application/json"]["schema"])
    assert set(reply["required"]) >= {
        "session_id",
        "model",
        "provider",
        "content",
        "finish_reason",
        "usage",
    }
    usage = resolve(schema, reply["properties"]["usage"])
    assert set(usage["properties"]) >= {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "estimated",
    }
    assert usage["properties"]["estimated"]["type"] == "boolean"


def test_generate_documents_the_event_stream_alternative(schema: dict[str, Any]) -> None:
    ok = schema["paths"]["/api/v1/llm/generate"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in ok
    stream = ok["text/event-stream"]
    examples: dict[str, dict[str, Any]] = stream.get("examples") or {}
    first: dict[str, Any] = next(iter(examples.values()), {})
    example = stream.get("example") or first.get("value")
    assert isinstance(example, str) and example
    frames = [line for line in example.splitlines() if line.startswith("data: ")]
    kinds = [line.split('"type": "', 1)[1].split('"', 1)[0] for line in frames]
    assert kinds[0] == "start"
    assert "token" in kinds
    assert kinds[-1] in ("done", "error")


@pytest.mark.parametrize("status", ["400", "413", "422", "502", "503"])
def test_generate_documents_error_statuses_with_the_error_body(
    schema: dict[str, Any], status: str
) -> None:
    responses = schema["paths"]["/api/v1/llm/generate"]["post"]["responses"]
    assert status in responses
    assert ref_name(responses[status]["content"]["application/json"]["schema"]) == "ErrorOut"


def test_error_body_schema(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    assert "ErrorOut" in components
    error_out = components["ErrorOut"]
    assert error_out["required"] == ["error"]
    detail = resolve(schema, error_out["properties"]["error"])
    assert set(detail["required"]) == {"code", "message"}
    assert detail["properties"]["code"]["type"] == "string"
    assert detail["properties"]["message"]["type"] == "string"
    # Examples of a code and a message.
    assert detail["properties"]["code"].get("examples")
    assert detail["properties"]["message"].get("examples")


def test_health_response_schema(schema: dict[str, Any]) -> None:
    responses = schema["paths"]["/api/v1/health"]["get"]["responses"]
    assert {"200", "503"} <= set(responses)
    health = resolve(schema, responses["200"]["content"]["application/json"]["schema"])
    assert set(health["required"]) >= {"status", "version", "checks"}
    assert set(health["properties"]["status"]["enum"]) == {"healthy", "degraded", "unhealthy"}
    checks = resolve(schema, health["properties"]["checks"])
    assert set(checks["properties"]) >= {"database", "llm"}
    assert ref_name(responses["503"]["content"]["application/json"]["schema"]) == ref_name(
        responses["200"]["content"]["application/json"]["schema"]
    )


def test_llm_status_response_schema(schema: dict[str, Any]) -> None:
    responses = schema["paths"]["/api/v1/llm/status"]["get"]["responses"]
    status = resolve(schema, responses["200"]["content"]["application/json"]["schema"])
    assert set(status["required"]) >= {
        "provider",
        "base_url",
        "reachable",
        "latency_ms",
        "models",
        "error",
        "database",
    }
    assert status["properties"]["models"]["type"] == "array"
    assert status["properties"]["reachable"]["type"] == "boolean"
    # Never a key, not even as a documented field.
    assert not any("key" in name.lower() for name in status["properties"])


def test_schema_has_examples_for_readers(schema: dict[str, Any]) -> None:
    engine = schema["components"]["schemas"]["DatabaseStatus"]["properties"]["engine"]
    assert engine.get("examples")
