"""`manage.py llm_ping`: ask the provider for its models; exit 0 when reachable, 1 when not.

It also reports the database and (with REDIS_URL) the channel layer, which do not change the
exit code.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from health import probes
from llm.checks import format_errors, run_llm_checks
from llm.conf import provider_aliases
from llm.providers import get_provider, providers
from llm.types import PingResult


class Command(BaseCommand):
    help = "Ping the LLM provider: list its models and measure latency. Exit 1 when unreachable."
    # Only the LLM settings matter here, checked in handle() so call_command() checks them too.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--provider", help="Provider alias (default: LLM_PROVIDER).")
        parser.add_argument(
            "--json", action="store_true", dest="as_json", help="Print the result as JSON."
        )

    def handle(
        self, *args: Any, provider: str | None = None, as_json: bool = False, **options: Any
    ) -> None:
        problems = format_errors(run_llm_checks())
        if problems:
            raise CommandError(problems)
        if provider is not None and provider not in provider_aliases():
            raise CommandError(
                f"(llm.E001) Unknown provider {provider!r}: "
                f"choose one of {', '.join(provider_aliases())}."
            )
        result, database, layer = asyncio.run(self._ping(provider))
        if as_json:
            report = asdict(result) | {"database": database}
            if layer is not None:
                report["channel_layer"] = layer
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self._print(result, database, layer)
        if not result.reachable:
            raise SystemExit(1)

    async def _ping(
        self, alias: str | None
    ) -> tuple[PingResult, dict[str, Any], dict[str, Any] | None]:
        """The provider, and beside it the database and channel layer this process would use."""
        try:
            return await asyncio.gather(
                get_provider(alias).ping(), probes.database(), probes.channel_layer()
            )
        finally:
            await providers.aclose()

    def _print(
        self, result: PingResult, database: dict[str, Any], layer: dict[str, Any] | None
    ) -> None:
        self.stdout.write(f"Provider: {result.provider}")
        self.stdout.write(f"URL:      {result.base_url}")
        if result.reachable:
            self.stdout.write(
                self.style.SUCCESS(f"Status:   reachable ({result.latency_ms:.1f} ms)")
            )
            self.stdout.write(f"Models:   {', '.join(result.models) or '(none listed)'}")
        else:
            error = result.error or {}
            self.stdout.write(self.style.ERROR("Status:   unreachable"))
            self.stdout.write(f"Error:    {error.get('code')}: {error.get('message')}")
        parts = [("Database", database)] + ([("Channels", layer)] if layer is not None else [])
        for label, part in parts:
            kind = part.get("engine") or part.get("backend")
            if part["status"] == "ok":
                self.stdout.write(f"{label + ':':<9} {kind}, ok ({part['latency_ms']:.1f} ms)")
            else:
                self.stdout.write(
                    f"{label + ':':<9} {kind}, {part['error']['code']}: {part['error']['message']}"
                )
