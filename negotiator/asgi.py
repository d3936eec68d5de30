"""ASGI entry point: HTTP through Django, WebSockets through Channels (served by daphne).

Bad LLM settings stop the server here with their system-check ids, not a traceback. Start-up
and shutdown work (`negotiator.lifecycle`) runs before the first request and as the server stops.
"""

import os
import sys

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "negotiator.settings")

django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from llm.checks import format_errors, run_llm_checks  # noqa: E402
from llm.routing import websocket_urlpatterns  # noqa: E402
from llm.security import HostsAndCorsOriginValidator  # noqa: E402

from . import websocket_server  # noqa: E402
from .lifecycle import StartUp, attach_to_daphne  # noqa: E402

websocket_server.install()

_problems = format_errors(run_llm_checks())
if _problems:
    print(f"Negotiator cannot start: fix these settings first.\n{_problems}", file=sys.stderr)
    raise SystemExit(1)

application = StartUp(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": HostsAndCorsOriginValidator(
                AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
            ),
        }
    )
)
attach_to_daphne(application)
