"""`GET /api/v1/health` and `GET /api/v1/llm/status`.

Their probes run concurrently, each bounded in time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from django.http import HttpRequest
from ninja import Router, Status

from negotiator import __version__

from . import probes
from .schemas import HealthOut, LLMStatusOut

router = Router(tags=["health"])


@router.get(
    "/health",
    response={200: HealthOut, 503: HealthOut},
    summary="Service health",
    description=(
        "200 healthy, or degraded (the LLM provider, or Redis when REDIS_URL is set, is down); "
        "503 unhealthy (the database is down)."
    ),
)
async def health(request: HttpRequest) -> Status[dict[str, Any]]:
    database, ping, layer = await asyncio.gather(
        probes.database(), probes.provider(), probes.channel_layer()
    )
    if database["status"] != "ok":
        status, code = "unhealthy", 503
    elif not ping.reachable or (layer is not None and layer["status"] != "ok"):
        status, code = "degraded", 200
    else:
        status, code = "healthy", 200
    llm = {
        "status": "ok" if ping.reachable else "error",
        "provider": ping.provider,
        "reachable": ping.reachable,
        "latency_ms": ping.latency_ms,
        "error": ping.error,
    }
    checks = {"database": database, "llm": llm, "channel_layer": layer}
    return Status(code, {"status": status, "version": __version__, "checks": checks})


@router.get(
    "/llm/status",
    response=LLMStatusOut,
    summary="LLM provider status",
    description="The selected provider: where it is, whether it answers, how fast, and its models.",
)
async def llm_status(request: HttpRequest) -> dict[str, Any]:
    database, ping = await asyncio.gather(probes.database(), probes.provider())
    return {
        "provider": ping.provider,
        "base_url": ping.base_url,
        "reachable": ping.reachable,
        "latency_ms": ping.latency_ms,
        "models": ping.models,
        "error": ping.error,
        "database": database,
    }
