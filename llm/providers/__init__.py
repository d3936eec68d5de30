"""Providers by alias, built lazily from `settings.LLM`, cached, reset when the setting changes.

Modelled on channels' `ChannelLayerManager`: `providers["lm_studio"]` builds the provider once,
`get_provider()` returns the selected one, `providers.reset()` drops them (tests).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from ..conf import llm_settings
from .base import OpenAICompatibleProvider

__all__ = ["OpenAICompatibleProvider", "ProviderManager", "get_provider", "providers"]


class ProviderManager:
    def __init__(self) -> None:
        self._providers: dict[str, OpenAICompatibleProvider] = {}
        setting_changed.connect(self._on_setting_changed)

    def _on_setting_changed(self, setting: str, **kwargs: Any) -> None:
        if setting == "LLM":
            self.reset()

    def reset(self) -> None:
        """Forget every built provider; the next lookup builds it again from settings."""
        self._providers = {}

    def __getitem__(self, alias: str) -> OpenAICompatibleProvider:
        try:
            return self._providers[alias]
        except KeyError:
            provider = self._providers[alias] = self.build(alias)
            return provider

    def build(self, alias: str) -> OpenAICompatibleProvider:
        conf = llm_settings()
        try:
            entry = conf["PROVIDERS"][alias]
        except KeyError:
            known = ", ".join(conf["PROVIDERS"])
            raise ImproperlyConfigured(
                f"(llm.E001) Unknown LLM provider {alias!r}: choose one of {known}."
            ) from None
        try:
            backend = import_string(entry["BACKEND"])
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"Cannot import BACKEND {entry['BACKEND']!r} of LLM provider {alias!r}."
            ) from exc
        return backend(alias, **{**conf.get("DEFAULTS", {}), **entry.get("CONFIG", {})})

    async def aclose(self) -> None:
        """Close every built provider's client on the running event loop."""
        for provider in self._providers.values():
            await provider.aclose()


providers = ProviderManager()


def get_provider(alias: str | None = None) -> OpenAICompatibleProvider:
    """The provider named `alias`, or the selected one (`LLM_PROVIDER`)."""
    return providers[alias or llm_settings()["PROVIDER"]]
