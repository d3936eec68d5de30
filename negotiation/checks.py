"""System checks for the negotiation settings (`manage.py check`; every entry point runs them)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error

# setting: (id, integer only, smallest allowed (exclusive), largest allowed, what it is)
RULES: dict[str, tuple[str, bool, float, float, str]] = {
    "NEGOTIATION_HUMAN_TIMEOUT": (
        "negotiation.E001",
        False,
        0,
        86400,
        "seconds to wait for a person's move",
    ),
    "NEGOTIATION_MESSAGE_MAX_TOKENS": (
        "negotiation.E002",
        True,
        0,
        4096,
        "tokens of a model's message",
    ),
    "NEGOTIATION_BETA": ("negotiation.E003", False, 0, 10, "the concession shape"),
}


def check_settings(**kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    for name, (check_id, integer, low, high, what) in RULES.items():
        value = getattr(settings, name)
        number_ok = isinstance(value, int | float) and not isinstance(value, bool)
        if integer:
            number_ok = number_ok and isinstance(value, int)
        if not number_ok or not math.isfinite(value) or not low < value <= high:
            kind = "a whole number" if integer else "a number"
            errors.append(
                Error(
                    f"{name} is {value!r}: it must be {kind} above {low:g} and at most {high:g} "
                    f"({what}).",
                    hint=f"Set {name} in the environment to {kind} in that range, or unset it.",
                    id=check_id,
                )
            )
    return errors


ALL_CHECKS: list[Callable[..., list[CheckMessage]]] = [check_settings]
