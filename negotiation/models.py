"""Stored negotiations: one row per negotiation, one per move, each LLM move linked to the `llm`
session that generated it (prompt, reply, timings, usage)."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone


class Negotiation(models.Model):
    """A buyer and a seller bargaining over one item. Its money is stored whole (the budget and the
    cost included): what each side and the public may see is decided where it is shown."""

    class Status(models.TextChoices):
        RUNNING = "running"
        DEAL = "deal"
        NO_DEAL = "no_deal"
        FAILED = "failed"
        CANCELLED = "cancelled"
        INTERRUPTED = "interrupted"

    class EndedBy(models.TextChoices):
        ACCEPT = "accept"
        WALK_AWAY = "walk_away"
        MAX_TURNS = "max_turns"
        TIMEOUT = "timeout"
        ERROR = "error"
        CANCEL = "cancel"
        RESTART = "restart"

    class Side(models.TextChoices):
        BUYER = "buyer"
        SELLER = "seller"

    class Policy(models.TextChoices):
        NARRATED = "narrated"
        LLM = "llm"
        HUMAN = "human"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.RUNNING, db_index=True
    )
    ended_by = models.CharField(max_length=16, choices=EndedBy.choices, blank=True)
    scenario_index = models.PositiveIntegerField(
        null=True, blank=True, help_text="The library product it was built from (empty: custom)."
    )
    item_title = models.CharField(max_length=500)
    item_category = models.CharField(max_length=100, blank=True)
    list_price = models.FloatField()
    buyer_budget = models.FloatField(help_text="Private to the buyer.")
    seller_cost = models.FloatField(help_text="Private to the seller.")
    buyer = models.JSONField(help_text="The buyer's policy, provider, model, temperature, persona.")
    seller = models.JSONField(
        help_text="The seller's policy, provider, model, temperature, persona."
    )
    buyer_policy = models.CharField(max_length=16, choices=Policy.choices, db_index=True)
    seller_policy = models.CharField(max_length=16, choices=Policy.choices, db_index=True)
    max_turns = models.PositiveSmallIntegerField(default=10)
    opening = models.CharField(max_length=8, choices=Side.choices, default=Side.SELLER)
    metrics = models.JSONField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Liveness, as for `llm` sessions: which process runs it, and when it last said so.
    worker = models.CharField(max_length=128, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "updated_at"], name="negotiation_liveness")]

    def __str__(self) -> str:
        return f"{self.item_title[:60]} ({self.status})"


class Move(models.Model):
    """One turn. An LLM-played move links to the `llm` session of its (last) generation."""

    class Action(models.TextChoices):
        OFFER = "offer"
        ACCEPT = "accept"
        REJECT = "reject"
        WALK_AWAY = "walk_away"

    negotiation = models.ForeignKey(Negotiation, related_name="moves", on_delete=models.CASCADE)
    turn = models.PositiveSmallIntegerField()
    side = models.CharField(max_length=8, choices=Negotiation.Side.choices)
    action = models.CharField(max_length=16, choices=Action.choices)
    price = models.FloatField(null=True, blank=True)
    message = models.TextField(blank=True)
    invalid = models.BooleanField(default=False, help_text="Refused twice by the rules.")
    reason = models.TextField(blank=True, help_text="Why the rules refused it (invalid moves).")
    session = models.ForeignKey(
        "llm.Session",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="negotiation_moves",
        help_text="The LLM session that generated this move.",
    )
    tokens = models.PositiveIntegerField(default=0, help_text="Tokens its generations used.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["negotiation_id", "turn"]
        constraints = [
            models.UniqueConstraint(fields=["negotiation", "turn"], name="negotiation_move_turn")
        ]

    def __str__(self) -> str:
        price = f" {self.price:.2f}" if self.price is not None else ""
        return f"{self.turn}. {self.side} {self.action}{price}"
