"""OpenRouter, the cloud router: a bearer key, attribution headers, errors inside the stream."""

from __future__ import annotations

from typing import Any

from ..exceptions import ProviderDisabled
from ..types import ChatRequest
from .base import OpenAICompatibleProvider


class OpenRouterProvider(OpenAICompatibleProvider):
    """Refuses with `LLM_PROVIDER_DISABLED` unless switched on and given a key.

    OpenRouter keeps idle streams open with `: OPENROUTER PROCESSING` comments (which the SSE
    parser drops and which do not reset the idle timeout), and reports a failure after the
    response started as a chunk with `error` and `finish_reason: "error"` (`LLM_BAD_GATEWAY`).
    """

    def __init__(
        self, alias: str, *, site_url: str = "", app_name: str = "", **config: Any
    ) -> None:
        self.site_url = site_url
        self.app_name = app_name
        # OpenRouter takes OpenAI's form for every model it routes to.
        config.setdefault("response_format", "json_schema")
        super().__init__(alias, **config)

    def check_enabled(self) -> None:
        if not self.enabled:
            raise ProviderDisabled(
                f"{self.alias} is switched off: set LLM_ENABLE_OPENROUTER=true to use it",
                provider=self.alias,
            )
        if not self._api_key:
            raise ProviderDisabled(
                f"{self.alias} has no API key: set OPENROUTER_API_KEY", provider=self.alias
            )

    def get_headers(self) -> dict[str, str]:
        headers = super().get_headers()
        if self.site_url:
            headers["HTTP-Referer"] = self.site_url
        if self.app_name:
            headers["X-Title"] = self.app_name
        return headers

    def build_payload(self, request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
        payload = super().build_payload(request, model, stream=stream)
        payload["usage"] = {"include": True}
        if "response_format" in payload:
            # Only to the models' providers that honour the schema, never silently ignored.
            payload["provider"] = {"require_parameters": True}
        return payload
