"""ASGI entry point: HTTP through Django, WebSockets through Channels (served by daphne).

Bad LLM settings, and a private name of another package that the code patches and the installed
version lacks (negotiator.E001), stop the server here with their system-check ids, not a
traceback. Start-up and shutdown work (`negotiator.lifecycle`) runs before the first request
and as the server stops.
"""

import os
import sys

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "negotiator.settings")

django_asgi_app = get_asgi_application()

from llm.checks import format_errors, run_llm_checks  # noqa: E402
from negotiation.checks import check_settings as check_negotiation_settings  # noqa: E402

# Before the modules that patch other packages' internals are imported: a private name they rely
# on that is gone stops the server here with negotiator.E001, not with a traceback.
_problems = format_errors(run_llm_checks()) or format_errors(check_negotiation_settings())
if _problems:
    print(f"Negotiator cannot start: fix these first.\n{_problems}", file=sys.stderr)
    raise SystemExit(1)

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402

from llm.security import HostsAndCorsOriginValidator  # noqa: E402

from . import websocket_server  # noqa: E402
from .lifecycle import StartUp, attach_to_daphne  # noqa: E402
from .routing import WebSocketRouter, websocket_urlpatterns  # noqa: E402

websocket_server.install()

application = StartUp(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": HostsAndCorsOriginValidator(
                AuthMiddlewareStack(WebSocketRouter(websocket_urlpatterns))
            ),
        }
    )
)
attach_to_daphne(application)
