"""HTTP face of the generation pipeline: `POST /api/v1/llm/generate`, as JSON or as SSE frames."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import orjson
from django.http import HttpRequest, StreamingHttpResponse
from ninja import Router

from .auth import api_token, client_key
from .frames import GenerationFrame, frame_schema
from .generation import Done, Failed, Generation
from .ratelimit import check_rate
from .schemas import ErrorOut, GenerateIn, GenerateOut, UsageOut
from .sessions import check_continuable

router = Router(tags=["llm"])

ERROR_STATUSES = (400, 401, 404, 409, 413, 422, 429, 502, 503)

SSE_EXAMPLE = (
    'data: {"type": "start", "session_id": "5f0c...", "provider": "lm_studio", '
    '"model": "SmolLM2-135M-Instruct"}\n\n'
    'data: {"type": "token", "text": "Hello"}\n\n'
    'data: {"type": "token", "text": " there!"}\n\n'
    'data: {"type": "done", "session_id": "5f0c...", "finish_reason": "stop", '
    '"usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, '
    '"estimated": true}}\n\n'
)


# One SSE event of `stream: true`: its `data` is one JSON frame, exactly as on the WebSocket.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": frame_schema(GenerationFrame),
        }
    },
}


@router.post(
    "/generate",
    response={200: GenerateOut, ERROR_STATUSES: ErrorOut},
    exclude_unset=True,  # `output` only when a response_format was given
    summary="Generate a reply",
    auth=api_token,
    description=(
        "Runs one completion on the selected provider. With `stream: false` (the default) the "
        "whole reply comes back as JSON. With `stream: true` the answer is `text/event-stream`: "
        "each SSE `data:` line is one frame, exactly as on the WebSocket: `start`, `token`..., "
        "then one `done` or `error`."
    ),
    openapi_extra={
        "responses": {
            200: {"content": {"text/event-stream": {"schema": SSE_EVENT, "example": SSE_EXAMPLE}}}
        }
    },
)
async def generate(
    request: HttpRequest, payload: GenerateIn
) -> GenerateOut | StreamingHttpResponse:
    await check_rate(client_key(request))
    generation = Generation(payload.to_request(), session_id=payload.session_key)
    if payload.stream:
        if payload.session_key:  # refuse with a status now: once streaming, errors are frames
            await check_continuable(payload.session_key)
        response = StreamingHttpResponse(sse_frames(generation), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    async with aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Done):
                reply = GenerateOut(
                    session_id=event.session_id,
                    model=generation.model or "",
                    provider=generation.provider or "",
                    content=generation.text,
                    finish_reason=event.finish_reason,
                    usage=UsageOut(**event.usage.as_frame()),
                )
                if event.structured:  # set only then: unset fields are left out of the reply
                    reply.output = event.output
                return reply
    raise AssertionError("the pipeline ended without a done or error event")


async def sse_frames(generation: Generation) -> AsyncIterator[bytes]:
    async with aclosing(generation.events()) as events:
        async for event in events:
            yield b"data: " + orjson.dumps(event.frame()) + b"\n\n"
