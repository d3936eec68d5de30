"""`GET /playground/`: one template and plain JavaScript; no build step, nothing from a CDN."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


async def index(request: HttpRequest) -> HttpResponse:
    user = await request.auser()
    context = {
        "is_staff": bool(user.is_active and user.is_staff),
        "token_required": bool(settings.API_TOKEN),
    }
    return render(request, "playground/index.html", context)
