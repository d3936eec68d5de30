"""The HTTP API (django-ninja, mounted at /api/v1/) and the one place errors become HTTP responses.

Every error body is `{"error": {"code": ..., "message": ...}}` with the contract's code and status.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import HttpError, ValidationError
from ninja.parser import Parser
from ninja.renderers import BaseRenderer
from ninja.responses import NinjaJSONEncoder

from health.api import router as health_router
from llm.api import router as llm_router
from llm.exceptions import InvalidJSON, InvalidRequest, MessageTooLarge, NegotiatorError

from . import __version__

logger = logging.getLogger("negotiator.api")


class JSONParser(Parser):
    """Parses request bodies, turning oversize and malformed ones into the contract's errors."""

    def parse_body(self, request: HttpRequest) -> Any:
        from django.conf import settings

        limit = settings.LLM_MAX_REQUEST_BYTES
        try:
            body = request.body
        except RequestDataTooBig as exc:
            raise MessageTooLarge(f"The request body is larger than {limit} bytes") from exc
        if len(body) > limit:
            raise MessageTooLarge(f"The request body is larger than {limit} bytes")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidJSON(f"The request body is not valid JSON: {exc}") from exc


class JSONRenderer(BaseRenderer):
    media_type = "application/json"

    def render(self, request: HttpRequest, data: Any, *, response_status: int) -> bytes:
        return orjson.dumps(data, default=NinjaJSONEncoder().default)


api = NinjaAPI(
    title="Negotiator API",
    version=__version__,
    description=(
        "LLM inference for negotiating agents: generate replies (JSON or a text/event-stream of "
        "frames), check health and the provider's status. Every error body is "
        '`{"error": {"code": "...", "message": "..."}}`; the codes are listed in the README.'
    ),
    urls_namespace="api",
    parser=JSONParser(),
    renderer=JSONRenderer(),
)
api.add_router("/", health_router)
api.add_router("/llm", llm_router)


def error_response(request: HttpRequest, error: NegotiatorError) -> HttpResponse:
    response = api.create_response(request, {"error": error.as_dict()}, status=error.status)
    retry_after = getattr(error, "retry_after", None)
    if error.status in (429, 503) and retry_after is not None:
        response["Retry-After"] = str(max(1, round(retry_after)))
    return response


@api.exception_handler(NegotiatorError)
def on_negotiator_error(request: HttpRequest, exc: NegotiatorError) -> HttpResponse:
    return error_response(request, exc)


@api.exception_handler(ValidationError)
def on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    return error_response(request, InvalidRequest(describe_validation_errors(exc.errors)))


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # Ninja wraps parser errors in HttpError(400); ours carry the contract's code.
    if isinstance(exc.__cause__, NegotiatorError):
        return error_response(request, exc.__cause__)
    error = NegotiatorError(str(exc))
    error.status, error.code = exc.status_code, _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
    return error_response(request, error)


_HTTP_CODES = {400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
               429: "RATE_LIMITED"}


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """`messages.0.role: Input should be 'system', 'user' or 'assistant'; ...` (fields named)."""
    parts = []
    for error in errors[:5]:
        loc = list(error.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[2:] if len(loc) > 1 and loc[1] == "payload" else loc[1:]
        field = ".".join(str(p) for p in loc) or "body"
        message = error.get("msg", "is invalid")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{field}: {message}")
    more = len(errors) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
