"""Stored sessions in Django admin: read-only history, for staff to read."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Message, Session


class ReadOnlyMixin:
    """History is never added, changed or deleted through the admin."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MessageInline(ReadOnlyMixin, admin.TabularInline):
    model = Message
    fields = ("position", "role", "content", "created_at")
    readonly_fields = fields
    ordering = ("position",)
    extra = 0
    can_delete = False


@admin.register(Session)
class SessionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "status",
        "provider",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "tokens_per_second",
        "created_at",
    )
    list_filter = ("status", "provider", "model", ("created_at", admin.DateFieldListFilter))
    search_fields = ("messages__content",)
    date_hierarchy = "created_at"
    inlines = (MessageInline,)
    fieldsets = (
        (None, {"fields": ("id", "status", "provider", "tried", "model", "finish_reason")}),
        ("Error", {"fields": ("error_code", "error_message")}),
        ("Usage", {"fields": ("prompt_tokens", "completion_tokens", "usage_estimated")}),
        ("Structured output", {"fields": ("response_format", "output")}),
        (
            "Timings",
            {
                "fields": (
                    "created_at",
                    "first_token_at",
                    "finished_at",
                    "ttft_ms",
                    "tokens_per_second",
                )
            },
        ),
        ("Process", {"fields": ("worker", "updated_at"), "classes": ("collapse",)}),
    )
    readonly_fields = tuple(f for _, section in fieldsets for f in section["fields"])


@admin.register(Message)
class MessageAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("session", "position", "role", "short_content", "created_at")
    list_filter = ("role",)
    search_fields = ("content",)
    list_select_related = ("session",)
    readonly_fields = ("session", "position", "role", "content", "created_at")

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:80]
