"""`GET /playground/` and `GET /playground/negotiations/`: one template each and plain JavaScript;
no build step, nothing from a CDN."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


async def _context(request: HttpRequest) -> dict[str, bool]:
    user = await request.auser()
    return {
        "is_staff": bool(user.is_active and user.is_staff),
        "token_required": bool(settings.API_TOKEN),
    }


async def index(request: HttpRequest) -> HttpResponse:
    return render(request, "playground/index.html", await _context(request))


async def negotiations(request: HttpRequest) -> HttpResponse:
    """A buyer and a seller bargaining live over `/ws/negotiations/`; watch, replay or play one."""
    return render(request, "playground/negotiations.html", await _context(request))
