from django.urls import path

from .consumers import LLMStreamConsumer

websocket_urlpatterns = [
    path("ws/llm/stream/", LLMStreamConsumer.as_asgi()),
]
