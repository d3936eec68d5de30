"""ASGI entry point: HTTP through Django, WebSockets through Channels (served by daphne).

Bad LLM settings stop the server here with their system-check ids, not a traceback. Before the
first request, sessions a dead process left `streaming` are marked `interrupted`.
"""

import logging
import os
import sys
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "negotiator.settings")

django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.db import database_sync_to_async  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.db import DatabaseError  # noqa: E402

from llm.checks import format_errors, run_llm_checks  # noqa: E402
from llm.providers import providers  # noqa: E402
from llm.routing import websocket_urlpatterns  # noqa: E402
from llm.security import HostsAndCorsOriginValidator  # noqa: E402
from llm.sessions import recover_interrupted  # noqa: E402

from . import websocket_server  # noqa: E402

websocket_server.install()

_problems = format_errors(run_llm_checks())
if _problems:
    print(f"Negotiator cannot start: fix these settings first.\n{_problems}", file=sys.stderr)
    raise SystemExit(1)



class StartUp:
    """Runs the start-up work once, before the first request: at the ASGI lifespan's start where
    the server has one (uvicorn), else on the first connection (daphne has no lifespan). At
    lifespan shutdown it closes the providers' HTTP clients (without one, process exit does)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.started = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self.started:
            self.started = True  # first: concurrent first requests need not wait or repeat it
            await database_sync_to_async(_recover)()
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await providers.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _recover() -> None:
    try:
        recover_interrupted()
    except DatabaseError as exc:  # not migrated yet: nothing to recover
        logging.getLogger("llm.sessions").warning("could not check for interrupted sessions: %s", exc)


application = StartUp(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": HostsAndCorsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    )
)
