"""LLM inference: providers, the streaming pipeline, stored sessions and the WebSocket relay.

What callers need, imported lazily (this package is a Django app, loaded before models are):

    from llm import ChatRequest, Generation, get_provider
    generation = Generation(ChatRequest(messages=[{"role": "user", "content": "Hi"}]))
    async for event in generation.events(): ...      # Start, Token..., Done | Failed

A `response_format=ResponseFormat(name, schema)` makes the reply JSON following the schema:
`Done.output` holds it parsed, or the generation ends `Failed` with `InvalidOutput`;
`FieldReader("message")` reads one string field of it while it streams.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ChatRequest": "llm.types",
    "Completion": "llm.types",
    "Message": "llm.types",
    "StreamChunk": "llm.types",
    "Usage": "llm.types",
    "Generation": "llm.generation",
    "Start": "llm.generation",
    "Token": "llm.generation",
    "Done": "llm.generation",
    "Failed": "llm.generation",
    "get_provider": "llm.providers",
    "providers": "llm.providers",
    "NegotiatorError": "llm.exceptions",
    "LLMError": "llm.exceptions",
    "ClientError": "llm.exceptions",
    "InvalidOutput": "llm.exceptions",
    "ResponseFormat": "llm.structured",
    "FieldReader": "llm.structured",
    # For apps that stream and store on the same mechanisms (negotiations):
    "Broadcaster": "llm.broadcast",
    "PerLoop": "llm.loops",
    "worker_id": "llm.sessions",
    "worker_alive": "llm.sessions",
    "reveal": "llm.sessions",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'llm' has no attribute {name!r}") from None
    return getattr(import_module(module), name)
