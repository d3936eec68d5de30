"""ASGI entry point: HTTP through Django, WebSockets through Channels (served by daphne).

Bad LLM settings stop the server here with their system-check ids, not a traceback.
"""

import os
import sys

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "negotiator.settings")

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from llm.checks import format_errors, run_llm_checks  # noqa: E402

_problems = format_errors(run_llm_checks())
if _problems:
    print(f"Negotiator cannot start: fix these settings first.\n{_problems}", file=sys.stderr)
    raise SystemExit(1)

application = ProtocolTypeRouter({"http": django_asgi_app})
