"""Stored negotiations in Django admin: read-only history, each with its moves and, for a move a
model wrote, a link to the `llm` session that generated it."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from llm.admin import ReadOnlyMixin

from .models import Move, Negotiation
from .rules import format_price


class MoveInline(ReadOnlyMixin, admin.TabularInline):
    model = Move
    fields = (
        "turn",
        "side",
        "action",
        "price",
        "message",
        "invalid",
        "reason",
        "tokens",
        "llm_session",
        "created_at",
    )
    readonly_fields = fields
    ordering = ("turn",)
    extra = 0
    can_delete = False

    @admin.display(description="LLM session")
    def llm_session(self, move: Move) -> str:
        if move.session_id is None:
            return "-"
        url = reverse("admin:llm_session_change", args=[move.session_id])
        return format_html('<a href="{}">{}</a>', url, str(move.session_id)[:8])


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@admin.register(Negotiation)
class NegotiationAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "item_title",
        "status",
        "ended_by",
        "buyer_policy",
        "seller_policy",
        "deal_price",
        "turns",
        "created_at",
    )
    list_filter = (
        "status",
        "buyer_policy",
        "seller_policy",
        "ended_by",
        ("created_at", admin.DateFieldListFilter),
    )
    search_fields = ("item_title",)
    date_hierarchy = "created_at"
    inlines = (MoveInline,)
    fieldsets = (
        (None, {"fields": ("id", "status", "ended_by", "created_at", "finished_at")}),
        (
            "Scenario",
            {
                "fields": (
                    "scenario_index",
                    "item_title",
                    "item_category",
                    "list_price",
                    "buyer_budget",
                    "seller_cost",
                )
            },
        ),
        (
            "Sides",
            {
                "fields": (
                    "buyer_policy",
                    "buyer",
                    "seller_policy",
                    "seller",
                    "max_turns",
                    "opening",
                )
            },
        ),
        ("Outcome", {"fields": ("metrics_table", "error_code", "error_message")}),
        ("Process", {"fields": ("worker", "updated_at"), "classes": ("collapse",)}),
    )
    readonly_fields = tuple(f for _, section in fieldsets for f in section["fields"])

    def get_queryset(self, request: HttpRequest) -> QuerySet[Negotiation]:
        return super().get_queryset(request).annotate(move_count=Count("moves"))

    @admin.display(description="deal price")
    def deal_price(self, negotiation: Negotiation) -> str:
        price = (negotiation.metrics or {}).get("price")
        return format_price(price) if isinstance(price, (int, float)) else "-"

    @admin.display(description="turns", ordering="move_count")
    def turns(self, negotiation: Negotiation) -> int:
        return int(getattr(negotiation, "move_count", 0))

    @admin.display(description="metrics")
    def metrics_table(self, negotiation: Negotiation) -> SafeString | str:
        metrics = negotiation.metrics
        if not metrics:
            return "-"
        rows = []
        for key, value in metrics.items():
            shown = format_price(value) if key == "price" and value is not None else _show(value)
            rows.append((key.replace("_", " "), shown))
        body = format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
        return format_html("<table>{}</table>", body)
