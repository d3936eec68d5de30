"""`manage.py serve` (what `make run` runs): daphne on HOST:PORT.

With the bundled model when needed.
"""

from __future__ import annotations

import sys
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from llm import local_model
from llm.conf import llm_settings
from llm.structured import remember_form


class Command(BaseCommand):
    help = (
        "Serve the ASGI app with daphne. With LLM_PROVIDER=lm_studio, LLM_LOCAL_MODEL=auto and "
        "nothing answering at a local LM_STUDIO_BASE_URL, start the bundled SmolLM2 model there "
        "first and stop it on exit."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", help="Bind address (default: HOST).")
        parser.add_argument("--port", type=int, help="Port (default: PORT).")

    def handle(self, *args: Any, host: str | None, port: int | None, **options: Any) -> None:
        # The settings' values only here, after the system checks (llm.E003 for a bad PORT).
        host, port = host or settings.SERVE_HOST, port or settings.SERVE_PORT
        # A console that is not a terminal (docker, systemd, `make run | tee`) would otherwise hold
        # these lines and daphne's access log in a block buffer until exit.
        reconfigure = getattr(sys.stdout, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(line_buffering=True)
        model = self._start_local_model()
        try:
            from daphne.cli import CommandLineInterface

            self.stdout.write(f"Serving on http://{host}:{port}/ (API docs at /api/v1/docs)")
            CommandLineInterface().run(["-b", host, "-p", str(port), "negotiator.asgi:application"])
        finally:
            if model is not None:
                self.stdout.write("Stopping the bundled model.")
                model.stop()

    def _start_local_model(self) -> local_model.LocalModelServer | None:
        conf = llm_settings()
        base_url = conf["PROVIDERS"]["lm_studio"]["CONFIG"]["base_url"]
        if conf["PROVIDER"] != "lm_studio" or conf["LOCAL_MODEL"] != "auto":
            return None
        if not local_model.is_local_url(base_url) or local_model.answers(base_url):
            return None
        server = local_model.LocalModelServer.for_url(base_url)
        self.stdout.write(
            f"Nothing answers at {base_url}: starting the bundled {local_model.MODEL_ALIAS} there "
            f"(llama-cpp-python, log in {server.log_path}). LLM_LOCAL_MODEL=off turns this off."
        )
        try:
            server.start()
        except (ImproperlyConfigured, RuntimeError, OSError) as exc:
            raise CommandError(f"Could not start the bundled model: {exc}") from exc
        # llama-cpp-python's server takes structured output in its own form: ask it so at once.
        remember_form(base_url, "json_object")
        self.stdout.write(self.style.SUCCESS(f"The bundled model answers at {server.base_url}."))
        return server
