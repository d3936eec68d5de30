"""Which browser origins may open the WebSocket: `ALLOWED_HOSTS` and `CORS_ALLOWED_ORIGINS`."""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings


class HostsAndCorsOriginValidator(OriginValidator):
    """channels' `AllowedHostsOriginValidator`, widened to the CORS origins the HTTP API allows.

    A handshake without an Origin header (websocat, server-to-server) is let through: browsers
    always send one, and the check exists to stop other sites' pages, not other programs.
    The settings are read per handshake, so `override_settings` applies.
    """

    def __init__(self, application: Any) -> None:
        super().__init__(application, allowed_origins=[])

    @property
    def allowed_origins(self) -> list[str]:
        hosts = list(settings.ALLOWED_HOSTS)
        if settings.DEBUG and not hosts:
            hosts = [".localhost", "127.0.0.1", "[::1]"]
        return [*hosts, *settings.CORS_ALLOWED_ORIGINS]

    @allowed_origins.setter
    def allowed_origins(self, value: list[str]) -> None:
        pass  # always derived from settings

    def valid_origin(self, parsed_origin: Any) -> bool:
        return parsed_origin is None or self.validate_origin(parsed_origin)
