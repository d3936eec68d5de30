"""`GET /api/v1/sessions` (paginated, filtered) and `GET /api/v1/sessions/{id}` (with its
messages)."""

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest
from ninja import Field, FilterSchema, Query, Router, Schema
from ninja.pagination import PageNumberPagination, paginate

from .auth import api_token
from .exceptions import SessionNotFound
from .models import Message, Session
from .schemas import ErrorDetail, ErrorOut, Text, UsageOut

router = Router(tags=["sessions"], auth=api_token)


def readable(request: HttpRequest) -> QuerySet[Session]:
    """The sessions this caller may read: all of them for staff, the others only those not
    `private` (a private one reads as not found)."""
    user = request.auth  # set by ninja's auth
    if getattr(user, "is_staff", False):
        return Session.objects.all()
    return Session.objects.filter(private=False)


class MessageOut(Schema):
    position: int
    role: Literal["system", "user", "assistant"]
    content: str
    created_at: datetime


class ProviderAttempt(Schema):
    provider: str
    code: str


class SessionOut(Schema):
    id: UUID
    provider: str = Field(description="The provider that served the latest reply.")
    tried: list[ProviderAttempt] = Field(description="Providers that failed before it (fallback).")
    model: str = Field(description="As the upstream reported it.")
    status: Literal["streaming", "completed", "cancelled", "failed", "interrupted"]
    finish_reason: str | None
    error: ErrorDetail | None
    usage: UsageOut | None
    created_at: datetime
    first_token_at: datetime | None
    finished_at: datetime | None
    ttft_ms: float | None
    tokens_per_second: float | None
    response_format: dict[str, Any] | None = Field(
        description="The JSON Schema the latest reply was asked to follow (OpenAI's shape)."
    )
    output: Any = Field(description="The latest reply parsed, when it followed that schema.")

    @staticmethod
    def resolve_finish_reason(obj: Session) -> str | None:
        return obj.finish_reason or None

    @staticmethod
    def resolve_error(obj: Session) -> dict[str, str] | None:
        return {"code": obj.error_code, "message": obj.error_message} if obj.error_code else None

    @staticmethod
    def resolve_usage(obj: Session) -> dict[str, int | bool] | None:
        if obj.prompt_tokens is None and obj.completion_tokens is None:
            return None
        return {
            "prompt_tokens": obj.prompt_tokens or 0,
            "completion_tokens": obj.completion_tokens or 0,
            "total_tokens": obj.total_tokens or 0,
            "estimated": obj.usage_estimated,
        }


class SessionDetailOut(SessionOut):
    messages: list[MessageOut]

    @staticmethod
    def resolve_messages(obj: Session) -> list[Message]:
        return obj.ordered_messages  # prefetched by the view: async code cannot query lazily


class SessionFilters(FilterSchema):
    status: Literal["streaming", "completed", "cancelled", "failed", "interrupted"] | None = None
    provider: Text | None = None
    model: Text | None = None


class SessionPages(PageNumberPagination):
    """Pages of at most 100; page numbers bounded so the database offset cannot overflow."""

    class Input(Schema):
        page: int = Field(1, ge=1, le=1_000_000)
        page_size: int | None = Field(None, ge=1, le=100)


@router.get(
    "",
    response={200: list[SessionOut], 401: ErrorOut, 422: ErrorOut},
    summary="List stored sessions",
    description=(
        "Newest first; filter by status, provider and model; `page` and `page_size` paginate."
    ),
)
@paginate(SessionPages, page_size=50, max_page_size=100)
async def list_sessions(request: HttpRequest, filters: Query[SessionFilters]) -> QuerySet[Session]:
    return filters.filter(readable(request))


@router.get(
    "/{session_id}",
    response={200: SessionDetailOut, 401: ErrorOut, 404: ErrorOut, 422: ErrorOut},
    summary="Read one stored session with its messages",
)
async def get_session(request: HttpRequest, session_id: UUID) -> Session:
    ordered = Prefetch(
        "messages", queryset=Message.objects.order_by("position"), to_attr="ordered_messages"
    )
    session = await readable(request).prefetch_related(ordered).filter(pk=session_id).afirst()
    if session is None:
        raise SessionNotFound(f"Session {session_id} does not exist")
    return session
