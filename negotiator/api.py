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
from llm.exceptions import (
    InvalidJSON,
    InvalidRequest,
    MessageTooLarge,
    NegotiatorError,
    Unauthorized,
)
from llm.schemas import describe_validation_errors
from llm.sessions_api import router as sessions_router
from negotiation.api import router as negotiations_router
from negotiation.api import scenarios_router

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
        "frames), check health and the provider's status; run negotiations between a buyer and a "
        "seller (LLM-played or a person) over the bundled scenario library. Every error body is "
        '`{"error": {"code": "...", "message": "..."}}`; the codes are listed in the README.'
    ),
    urls_namespace="api",
    parser=JSONParser(),
    renderer=JSONRenderer(),
)
api.add_router("/", health_router)
api.add_router("/llm", llm_router)
api.add_router("/sessions", sessions_router)
api.add_router("/scenarios", scenarios_router)
api.add_router("/negotiations", negotiations_router)


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
    if request.method in ("POST", "PUT", "PATCH") and not request.body:
        # Ninja validates an empty body without parsing it; it is not JSON.
        return error_response(request, InvalidJSON("The request body is empty: send a JSON object"))
    return error_response(request, InvalidRequest(describe_validation_errors(exc.errors)))


@api.exception_handler(RequestDataTooBig)
def on_body_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    # Raised by Django when ninja first reads `request.body`, before our parser runs.
    from django.conf import settings

    return error_response(
        request,
        MessageTooLarge(f"The request body is larger than {settings.LLM_MAX_REQUEST_BYTES} bytes"),
    )


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # Ninja wraps parser errors in HttpError(400); ours ride along as the cause.
    if isinstance(exc.__cause__, NegotiatorError):
        return error_response(request, exc.__cause__)
    if exc.status_code == 401:
        return error_response(
            request,
            Unauthorized(
                "Send `Authorization: Bearer <API_TOKEN>`, or log in as a staff user "
                "(and send the CSRF token with a POST)"
            ),
        )
    body = {"error": {"code": f"HTTP_{exc.status_code}", "message": str(exc)}}
    return api.create_response(request, body, status=exc.status_code)


@api.exception_handler(Exception)
def on_unexpected_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    logger.exception("unhandled error in %s %s", request.method, request.path)
    body = {
        "error": {"code": "INTERNAL_ERROR", "message": "The server failed; the error is logged."}
    }
    return api.create_response(request, body, status=500)
