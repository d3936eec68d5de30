from django.contrib import admin
from django.urls import path

from playground import views as playground

from . import views
from .api import api

urlpatterns = [
    path("", views.index, name="index"),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("playground/", playground.index, name="playground"),
    path("playground/negotiations/", playground.negotiations, name="playground-negotiations"),
]
