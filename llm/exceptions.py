"""The one exception tree: every error a client, an operator or a face can meet.

Each class carries its contract code (``../shared/CONTRACT.md``) and HTTP status, so faces
map an error by reading ``exc.code`` / ``exc.status``, never with ``if`` chains::

    NegotiatorError
     ├── InternalError              INTERNAL_ERROR         500  a bug: logged, never shown
     ├── WatchUnavailable           WATCH_UNAVAILABLE      503  no live frames can come for a watch
     ├── LLMError                   the upstream model server or its selection
     │    ├── ProviderDisabled      LLM_PROVIDER_DISABLED  400
     │    ├── UpstreamTimeout       LLM_TIMEOUT            503  connect/read timeout, stalled stream
     │    ├── UpstreamUnavailable   LLM_UNAVAILABLE        503  refused, 5xx/429 after retries
     │    ├── BadGateway            LLM_BAD_GATEWAY        502  bad JSON, error chunk, cut stream
     │    ├── InvalidOutput         LLM_INVALID_OUTPUT     502  a structured reply off its schema
     │    └── UpstreamRejected      LLM_BAD_REQUEST        400  4xx other than 408/429
     └── ClientError                what the client sent
          ├── InvalidJSON           INVALID_JSON           400
          ├── InvalidRequest        INVALID_REQUEST        422
          ├── MessageTooLarge       MESSAGE_TOO_LARGE      413
          ├── UnknownType           UNKNOWN_TYPE           400
          ├── GenerationInProgress  GENERATION_IN_PROGRESS 409
          ├── SessionNotFound       SESSION_NOT_FOUND      404
          ├── Unauthorized          UNAUTHORIZED           401
          ├── RateLimited           RATE_LIMITED           429
          └── WatchLagged           WATCH_LAGGED           -    a watcher too slow to keep up

Lower-level errors (httpx, JSON) are mapped to the most specific class and chained with
``from``. Bad settings are ``django.core.exceptions.ImproperlyConfigured``, outside this tree.
Messages never contain a secret: they are shown to clients as they are.
"""

from __future__ import annotations


class NegotiatorError(Exception):
    """Base of every error with a contract code."""

    code: str = "INTERNAL_ERROR"
    status: int = 500
    retryable: bool = False

    def __init__(self, message: str, *, provider: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InternalError(NegotiatorError):
    """The server failed in a way no other class names; the details go to the log only."""

    code = "INTERNAL_ERROR"
    status = 500


class WatchUnavailable(NegotiatorError):
    """A watched session is stored `streaming`, but no process answers for it.

    Nothing live will come.
    """

    code = "WATCH_UNAVAILABLE"
    status = 503


class LLMError(NegotiatorError):
    """The upstream model server failed, refused, or is switched off."""

    code = "LLM_ERROR"
    status = 502


class ProviderDisabled(LLMError):
    code = "LLM_PROVIDER_DISABLED"
    status = 400


class UpstreamTimeout(LLMError):
    code = "LLM_TIMEOUT"
    status = 503
    retryable = True


class UpstreamUnavailable(LLMError):
    code = "LLM_UNAVAILABLE"
    status = 503
    retryable = True

    def __init__(
        self, message: str, *, provider: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, provider=provider)
        self.retry_after = retry_after


class BadGateway(LLMError):
    code = "LLM_BAD_GATEWAY"
    status = 502


class InvalidOutput(LLMError):
    """A reply asked to follow a JSON Schema is not JSON, or does not follow it."""

    code = "LLM_INVALID_OUTPUT"
    status = 502


class UpstreamRejected(LLMError):
    code = "LLM_BAD_REQUEST"
    status = 400


class ClientError(NegotiatorError):
    """The client sent something this server will not serve."""

    code = "BAD_REQUEST"
    status = 400


class InvalidJSON(ClientError):
    code = "INVALID_JSON"
    status = 400


class InvalidRequest(ClientError):
    code = "INVALID_REQUEST"
    status = 422


class MessageTooLarge(ClientError):
    code = "MESSAGE_TOO_LARGE"
    status = 413


class UnknownType(ClientError):
    code = "UNKNOWN_TYPE"
    status = 400


class GenerationInProgress(ClientError):
    code = "GENERATION_IN_PROGRESS"
    status = 409


class SessionNotFound(ClientError):
    code = "SESSION_NOT_FOUND"
    status = 404


class Unauthorized(ClientError):
    code = "UNAUTHORIZED"
    status = 401


class RateLimited(ClientError):
    code = "RATE_LIMITED"
    status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WatchLagged(ClientError):
    """A watcher read so slowly that frames for it were dropped.

    Its watch ends, the generation goes on.
    """

    code = "WATCH_LAGGED"
    status = 409
