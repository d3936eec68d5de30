"""Stored sessions: one row per conversation, one per turn.

So staff can read them and clients continue them.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone


class Session(models.Model):
    """A conversation.

    Its provider, model, status, usage and timings are those of its latest reply.
    """

    class Status(models.TextChoices):
        STREAMING = "streaming"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"
        INTERRUPTED = "interrupted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    provider = models.CharField(
        max_length=64, db_index=True, help_text="The provider that served the reply."
    )
    tried = models.JSONField(
        default=list,
        blank=True,
        help_text="Providers that failed before it, with their error codes.",
    )
    model = models.CharField(
        max_length=255, blank=True, db_index=True, help_text="As the upstream reported it."
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.STREAMING, db_index=True
    )
    finish_reason = models.CharField(max_length=32, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    usage_estimated = models.BooleanField(
        default=False, help_text="Counted here: the upstream sent no usage."
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    ttft_ms = models.FloatField("TTFT (ms)", null=True, blank=True)
    tokens_per_second = models.FloatField("tokens/s", null=True, blank=True)
    private = models.BooleanField(
        default=False,
        help_text="Kept out of the sessions API (admin shows it): e.g. a model's move in a "
        "negotiation while a person plays the other side, whose prompt holds its private number.",
    )
    response_format = models.JSONField(
        null=True, blank=True, help_text="The JSON Schema the latest reply was asked to follow."
    )
    output = models.JSONField(
        null=True, blank=True, help_text="The latest reply parsed, when it followed its schema."
    )
    # Liveness: which process streams it, and when it last saved
    # (see `llm.sessions.recover_interrupted`).
    worker = models.CharField(max_length=128, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        # Not "Sessions": admin lists Django's own login sessions under that name too.
        verbose_name = "LLM session"
        verbose_name_plural = "LLM sessions"
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "updated_at"], name="llm_session_liveness")]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


class Message(models.Model):
    """One turn of a session, in order (`position`)."""

    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"

    session = models.ForeignKey(Session, related_name="messages", on_delete=models.CASCADE)
    position = models.PositiveIntegerField()
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "LLM message"
        verbose_name_plural = "LLM messages"
        # The column: "session" would join Session for its order.
        ordering = ["session_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["session", "position"], name="llm_message_position")
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"
