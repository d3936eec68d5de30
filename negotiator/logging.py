"""Logging helpers: keep secrets out of every log line, whatever code wrote it."""

from __future__ import annotations

import logging
import os


def usable_log_dir(path: str) -> bool:
    """Whether `path` is a folder this process can create and write files in (LOG_DIR)."""
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def secrets() -> list[str]:
    """The values that must never be logged (read lazily: logging starts before apps load)."""
    from django.conf import settings

    if not settings.configured:
        return []
    values = [getattr(settings, "API_TOKEN", "")]
    for entry in getattr(settings, "LLM", {}).get("PROVIDERS", {}).values():
        values.append(entry.get("CONFIG", {}).get("api_key", ""))
    return [value for value in values if value and len(value) >= 4]


def redact(text: str, values: list[str] | None = None) -> str:
    for value in values if values is not None else secrets():
        text = text.replace(value, "[redacted]")
    return text


class RedactSecrets(logging.Filter):
    """Replace secret values in the message and in any traceback text with `[redacted]`."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = secrets()
        if not values:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it, as it would without us
            return True
        cleaned = redact(message, values)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, values)
        return True
