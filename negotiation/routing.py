from django.urls import path

from .consumers import NegotiationConsumer

websocket_urlpatterns = [
    path("ws/negotiations/", NegotiationConsumer.as_asgi()),
]
