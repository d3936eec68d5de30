"""The one accessor for LLM settings (read from the environment in `negotiator/settings.py`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings


def llm_settings() -> dict[str, Any]:
    return settings.LLM


def provider_aliases() -> list[str]:
    return list(llm_settings()["PROVIDERS"])


def provider_chain() -> list[str]:
    """The primary provider, then the fallbacks, each once."""
    conf = llm_settings()
    chain = [conf["PROVIDER"], *conf.get("FALLBACK_PROVIDERS", [])]
    return list(dict.fromkeys(chain))
