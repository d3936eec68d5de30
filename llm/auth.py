"""`API_TOKEN`: when set, generating and reading sessions need it (or a logged-in staff user)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from django.conf import settings
from django.http import HttpRequest
from django.utils.crypto import constant_time_compare
from ninja.utils import check_csrf

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def token_matches(given: str | None) -> bool:
    expected = settings.API_TOKEN
    return bool(expected) and given is not None and constant_time_compare(given, expected)


def _is_staff(user: Any) -> bool:
    return bool(user is not None and user.is_active and user.is_staff)


async def api_token(request: HttpRequest) -> Any:
    """Ninja auth: the token, a staff user (with the CSRF token on a POST), or anyone when no
    `API_TOKEN` is set; None -> 401."""
    if not settings.API_TOKEN:
        return "anonymous"
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token_matches(credentials.strip()):
        return "token"
    user = await request.auser()
    if not _is_staff(user):
        return None
    # A session cookie rides along on other sites' requests too: for a POST it counts only
    # with Django's CSRF token (ninja exempts its views from the middleware's own check).
    if request.method not in SAFE_METHODS and not _csrf_passes(request):
        return None
    return user


def _csrf_passes(request: HttpRequest) -> bool:
    try:
        return check_csrf(request) is None
    except Exception:  # a body the check cannot read (a broken multipart form) carries no token
        return False


def socket_token(scope: dict[str, Any]) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[0] if values else None


def socket_authorized(scope: dict[str, Any]) -> bool:
    """The WebSocket form: `?token=` on the URL, or a staff user's session cookie."""
    if not settings.API_TOKEN:
        return True
    return token_matches(socket_token(scope)) or _is_staff(scope.get("user"))


def client_key(client: HttpRequest | dict[str, Any]) -> str:
    """Whom a rate limit counts, for either face (an HTTP request or a WebSocket scope): the API
    token's holder when it sent the token, else the client's address."""
    if isinstance(client, HttpRequest):
        scheme, _, credentials = client.headers.get("Authorization", "").partition(" ")
        by_token = scheme.lower() == "bearer" and token_matches(credentials.strip())
        ip = client.META.get("REMOTE_ADDR")
    else:
        by_token = token_matches(socket_token(client))
        ip = (client.get("client") or (None,))[0]
    return "token" if by_token else f"ip:{ip or 'unknown'}"
