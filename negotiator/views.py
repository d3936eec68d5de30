"""The root URL: what this service is and where its docs are."""

from django.http import HttpRequest, JsonResponse

from . import __version__


def index(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "name": "negotiator",
            "version": __version__,
            "docs": "/api/v1/docs",
            "playground": "/playground/",
            "negotiations_playground": "/playground/negotiations/",
        }
    )
