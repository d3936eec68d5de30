"""LM Studio, or any local OpenAI-compatible server (llama.cpp's, the bundled SmolLM2)."""

from __future__ import annotations

from .base import OpenAICompatibleProvider


class LMStudioProvider(OpenAICompatibleProvider):
    """No key, no extra headers; serves whatever model is loaded, whatever name is asked for.

    It sends no usage, so the streaming core counts tokens itself and marks them estimated.
    """
