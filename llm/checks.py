"""System checks for the LLM settings: `manage.py check` and every entry point run them.

Each message names the environment variable and says how to fix it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning

from negotiator.internals import check_internals
from negotiator.logging import usable_log_dir

from .conf import llm_settings, provider_chain
from .structured import FORMS

# Which environment variable sets each provider option (for messages users can act on).
ENV_NAMES = {
    "read_timeout": "LM_STUDIO_TIMEOUT",
    "connect_timeout": "LLM_CONNECT_TIMEOUT",
    "idle_timeout": "LLM_STREAM_IDLE_TIMEOUT",
    "ping_timeout": "LLM_PING_TIMEOUT",
    "retry_delay": "LLM_RETRY_DELAY",
    "retry_after_max": "LLM_RETRY_AFTER_MAX",
    "max_retries": "LLM_MAX_RETRIES",
    "max_connections": "LLM_MAX_CONNECTIONS",
    "max_keepalive": "LLM_MAX_KEEPALIVE",
    "max_tokens": "LLM_MAX_TOKENS",
}
BASE_URL_ENV = {"lm_studio": "LM_STUDIO_BASE_URL", "openrouter": "OPENROUTER_BASE_URL"}

# option: (integer only, smallest allowed, whether the smallest is allowed)
_POSITIVE = (False, 0, False)
_NON_NEGATIVE = (False, 0, True)
NUMBER_RULES = {
    "read_timeout": _POSITIVE,
    "connect_timeout": _POSITIVE,
    "idle_timeout": _POSITIVE,
    "ping_timeout": _POSITIVE,
    "retry_delay": _NON_NEGATIVE,
    "retry_after_max": _NON_NEGATIVE,
    "max_retries": (True, 0, True),
    "max_connections": (True, 0, False),
    "max_keepalive": (True, 0, True),
    "max_tokens": (True, 0, False),
}


def check_provider(**kwargs: Any) -> list[CheckMessage]:
    conf = llm_settings()
    known = list(conf["PROVIDERS"])
    errors: list[CheckMessage] = []
    if conf["PROVIDER"] not in known:
        errors.append(
            Error(
                f"LLM_PROVIDER is {conf['PROVIDER']!r}, which is not a provider.",
                hint=f"Set LLM_PROVIDER to one of: {', '.join(known)}.",
                id="llm.E001",
            )
        )
    unknown = [alias for alias in conf.get("FALLBACK_PROVIDERS", []) if alias not in known]
    if unknown:
        errors.append(
            Error(
                f"LLM_FALLBACK_PROVIDERS names unknown providers: {', '.join(unknown)}.",
                hint=f"List only these, comma-separated: {', '.join(known)}.",
                id="llm.E005",
            )
        )
    if conf.get("LOCAL_MODEL") not in ("auto", "off"):
        errors.append(
            Error(
                f"LLM_LOCAL_MODEL is {conf.get('LOCAL_MODEL')!r}.",
                hint="Set LLM_LOCAL_MODEL to 'auto' (start the bundled model when needed) "
                "or 'off'.",
                id="llm.E006",
            )
        )
    return errors


def check_base_urls(**kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    for alias, entry in llm_settings()["PROVIDERS"].items():
        url = entry.get("CONFIG", {}).get("base_url", "")
        parts = urlsplit(url) if isinstance(url, str) else None
        if not parts or parts.scheme not in ("http", "https") or not parts.hostname:
            name = BASE_URL_ENV.get(alias, f"the base_url of provider {alias!r}")
            errors.append(
                Error(
                    f"{name} is {url!r}, which is not an http(s) URL.",
                    hint=f"Set {name} to the server's OpenAI-compatible base URL, "
                    "e.g. http://localhost:1234/v1.",
                    id="llm.E002",
                )
            )
    return errors


def check_proxies(**kwargs: Any) -> list[CheckMessage]:
    """The proxy each provider in use would be reached through, if any.

    From HTTPS_PROXY and the like.
    """
    from .providers.network import environment_proxy

    errors: list[CheckMessage] = []
    known = llm_settings()["PROVIDERS"]
    for alias in (alias for alias in provider_chain() if alias in known):
        url = known[alias].get("CONFIG", {}).get("base_url", "")
        try:
            proxy = environment_proxy(url)
        except Exception:  # a base URL that is no URL: llm.E002 says so
            continue
        if proxy is None:
            continue
        try:
            scheme = httpx.Proxy(proxy).url.scheme
        except ValueError:
            scheme = None
        if scheme is None:
            problem = "is not an http, https or socks5 URL"
        elif scheme.startswith("socks") and importlib.util.find_spec("socksio") is None:
            problem = "is a SOCKS proxy, and the socksio package is not installed"
        else:
            continue
        error = Error(
            f"The proxy for provider {alias!r}, {proxy!r} "
            f"(HTTPS_PROXY, HTTP_PROXY or ALL_PROXY), {problem}.",
            hint="Set it to a URL like http://proxy.example.com:3128 "
            "(for SOCKS, install httpx[socks]), or list the provider's host in NO_PROXY.",
            id="llm.E010",
        )
        if error not in errors:
            errors.append(error)
    return errors


def check_numbers(**kwargs: Any) -> list[CheckMessage]:
    """Each provider's options as it will run with them (its CONFIG over the DEFAULTS)."""
    conf = llm_settings()
    errors: list[CheckMessage] = []
    for entry in conf["PROVIDERS"].values():
        options = {**conf.get("DEFAULTS", {}), **entry.get("CONFIG", {})}
        for option, value in options.items():
            if option in NUMBER_RULES:
                error = _number_error(ENV_NAMES[option], value, *NUMBER_RULES[option])
                if error is not None and error not in errors:
                    errors.append(error)
    whole_numbers = (
        ("LLM_MAX_REQUEST_BYTES", "LLM_MAX_REQUEST_BYTES", 0, False),
        ("LLM_MAX_SEND_BUFFER_BYTES", "LLM_MAX_SEND_BUFFER_BYTES", 0, True),
        ("DATABASE_POOL_SIZE", "DATABASE_POOL_SIZE", 0, False),
        ("DJANGO_HSTS_SECONDS", "DJANGO_HSTS_SECONDS", 0, True),  # only set with debug off
        ("PORT", "SERVE_PORT", 0, False),
    )
    for name, setting, minimum, inclusive in whole_numbers:
        if hasattr(settings, setting):
            error = _number_error(name, getattr(settings, setting), True, minimum, inclusive)
            if error is not None:
                errors.append(error)
    port = getattr(settings, "SERVE_PORT", 8000)
    if isinstance(port, int) and port > 65535:
        errors.append(
            Error(
                f"PORT is {port!r}; a TCP port is at most 65535.",
                hint="Set PORT to a free TCP port, e.g. 8000.",
                id="llm.E003",
            )
        )
    return errors


def check_response_format(**kwargs: Any) -> list[CheckMessage]:
    """The form of structured output each provider is configured to send (auto finds it)."""
    errors: list[CheckMessage] = []
    for alias, entry in llm_settings()["PROVIDERS"].items():
        form = entry.get("CONFIG", {}).get("response_format", "auto")
        if form not in ("auto", *FORMS):
            name = (
                "LM_STUDIO_RESPONSE_FORMAT"
                if alias == "lm_studio"
                else f"{alias}'s response_format"
            )
            errors.append(
                Error(
                    f"{name} is {form!r}.",
                    hint=f"Set {name} to auto (found by asking the server), json_schema "
                    "(OpenAI's form: LM Studio, OpenRouter) or json_object (llama-cpp-python).",
                    id="llm.E012",
                )
            )
    return errors


def check_database_url(**kwargs: Any) -> list[CheckMessage]:
    problem = getattr(settings, "DATABASE_URL_PROBLEM", "")
    if not problem:
        return []
    return [
        Error(
            f"DATABASE_URL is not a database URL this project can use: {problem}.",
            hint="Set DATABASE_URL to postgres://user:password@host:5432/name "
            "or sqlite:///path/to/db.sqlite3, or unset it for the SQLite file beside manage.py.",
            id="llm.E011",
        )
    ]


def check_logging(**kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    level = settings.LOG_LEVEL
    if level not in logging.getLevelNamesMapping():
        errors.append(
            Error(
                f"LOG_LEVEL is {level!r}, which is not a logging level.",
                hint="Set LOG_LEVEL to DEBUG, INFO, WARNING, ERROR or CRITICAL.",
                id="llm.E008",
            )
        )
    log_dir = settings.LOG_DIR
    if log_dir and not usable_log_dir(log_dir):
        errors.append(
            Error(
                f"LOG_DIR is {log_dir!r}, a folder this process cannot create or write in.",
                hint="Set LOG_DIR to a writable folder (it is created if missing), "
                "or unset it to log to the console only.",
                id="llm.E009",
            )
        )
    return errors


def _number_error(
    name: str, value: Any, integer: bool, minimum: float, inclusive: bool
) -> Error | None:
    kind = "a whole number" if integer else "a number"
    bound = f"{'at least' if inclusive else 'greater than'} {minimum}"
    numeric = isinstance(value, int) if integer else isinstance(value, int | float)
    if (
        numeric
        and not isinstance(value, bool)
        and (value >= minimum if inclusive else value > minimum)
    ):
        return None
    return Error(
        f"{name} is {value!r}; it must be {kind} {bound}.",
        hint=f"Set {name} to {kind} {bound}, or unset it to use the default.",
        id="llm.E003",
    )


def check_openrouter_key(**kwargs: Any) -> list[CheckMessage]:
    """The key itself is never put in a message."""
    conf = llm_settings()
    entry = conf["PROVIDERS"].get("openrouter")
    if entry is None:
        return []
    config = entry.get("CONFIG", {})
    in_use = "openrouter" in (conf["PROVIDER"], *conf.get("FALLBACK_PROVIDERS", []))
    if not in_use:
        return []
    if not config.get("enabled"):
        return [
            Warning(
                "OpenRouter is selected but LLM_ENABLE_OPENROUTER is false, so every request "
                "to it fails with LLM_PROVIDER_DISABLED.",
                hint="Set LLM_ENABLE_OPENROUTER=true (and OPENROUTER_API_KEY), "
                "or pick another provider.",
                id="llm.W001",
            )
        ]
    if not config.get("api_key"):
        return [
            Error(
                "OpenRouter is selected and enabled but OPENROUTER_API_KEY is empty.",
                hint="Set OPENROUTER_API_KEY to a key from https://openrouter.ai/keys.",
                id="llm.E004",
            )
        ]
    return []


def check_rate_limit(**kwargs: Any) -> list[CheckMessage]:
    from .ratelimit import parse_rate

    try:
        parse_rate(settings.LLM_RATE_LIMIT)
    except ValueError:
        return [
            Error(
                f"LLM_RATE_LIMIT is {settings.LLM_RATE_LIMIT!r}, which is not a rate.",
                hint="Set LLM_RATE_LIMIT to a count per period, e.g. 60/m, 5/s, 1000/h, or off.",
                id="llm.E007",
            )
        ]
    return []


def check_api_token(**kwargs: Any) -> list[CheckMessage]:
    if settings.DEBUG or settings.API_TOKEN:
        return []
    return [
        Warning(
            "API_TOKEN is empty with debug off: anyone who reaches this server can generate "
            "(spending your provider's tokens) and read every stored session.",
            hint='Set API_TOKEN to a long random value (e.g. `python -c "import secrets; '
            'print(secrets.token_urlsafe(32))"`) unless a proxy in front authenticates clients.',
            id="llm.W002",
        )
    ]


ALL_CHECKS = (
    check_internals,  # negotiator.E001: other packages' private names we patch
    check_provider,
    check_base_urls,
    check_proxies,
    check_numbers,
    check_openrouter_key,
    check_rate_limit,
    check_logging,
    check_database_url,
    check_response_format,
)
# Run by `manage.py check --deploy`, as Django's own security checks are.
DEPLOY_CHECKS = (check_api_token,)


def run_llm_checks() -> list[CheckMessage]:
    # A patched private name that is gone (negotiator.E001) is reported alone: the other checks
    # import the modules that patch, which could then stop on it with a traceback.
    internals = check_internals()
    if internals:
        return internals
    return [message for check in ALL_CHECKS if check is not check_internals for message in check()]


def format_errors(messages: Iterable[CheckMessage]) -> str:
    """One line per serious message, as `manage.py check` prints them."""
    return "\n".join(
        f"({m.id}) {m.msg}" + (f" HINT: {m.hint}" if m.hint else "")
        for m in messages
        if m.is_serious()
    )
