"""Response shapes of the health endpoints."""

from __future__ import annotations

from typing import Literal

from ninja import Schema
from pydantic import Field

from llm.schemas import ErrorDetail


class DatabaseStatus(Schema):
    status: Literal["ok", "error"]
    engine: str = Field(examples=["sqlite", "postgresql"])
    latency_ms: float | None
    error: ErrorDetail | None = None


class ChannelLayerStatus(Schema):
    status: Literal["ok", "error"]
    backend: str = Field(examples=["ResilientRedisChannelLayer"])
    latency_ms: float | None
    error: ErrorDetail | None = None


class LLMCheck(Schema):
    status: Literal["ok", "error"]
    provider: str
    reachable: bool
    latency_ms: float | None
    error: ErrorDetail | None = None


class HealthChecks(Schema):
    database: DatabaseStatus
    llm: LLMCheck
    channel_layer: ChannelLayerStatus | None = Field(
        default=None, description="Present when REDIS_URL is set: a round trip through Redis."
    )


class HealthOut(Schema):
    status: Literal["healthy", "degraded", "unhealthy"] = Field(
        description="healthy: all fine; degraded: the database answers but the provider or the "
        "channel layer (Redis) does not; unhealthy (HTTP 503): the database does not answer."
    )
    version: str
    checks: HealthChecks


class LLMStatusOut(Schema):
    provider: str
    base_url: str
    reachable: bool
    latency_ms: float | None
    models: list[str]
    error: ErrorDetail | None
    database: DatabaseStatus
