"""Django settings, read once from the environment (the variables are listed in ../README.md).

Nothing else in the project reads the environment: code reaches these values through
`django.conf.settings` (the LLM ones through `llm.conf`), so tests override them with
`override_settings`. Values that do not parse are kept as given and reported by the system
checks in `llm/checks.py` instead of failing here with a traceback.
"""

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import environ

from negotiator.logging import usable_log_dir

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()


def _number(var: str, default: float, cast: type = float) -> float | str:
    """Read a numeric variable; keep an unparsable value as text for `llm.E003` to report."""
    try:
        return cast(env.str(var, default=str(default)).strip())
    except ValueError:
        return env.str(var)


def _words(var: str) -> list[str]:
    return [word.strip() for word in env.list(var, default=[]) if word.strip()]


# Django core ------------------------------------------------------------------

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env.str(
    "DJANGO_SECRET_KEY",
    default="django-insecure-dev-only-key-set-DJANGO_SECRET_KEY-in-production",
)
ALLOWED_HOSTS = _words("DJANGO_ALLOWED_HOSTS") or ["localhost", "127.0.0.1", "[::1]", "testserver"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "servestatic",
    "corsheaders",
    "channels",
    "ninja",
    "llm",
    "health",
    "playground",
    "negotiation",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Admin and API-docs assets, served async (whitenoise's middleware is sync-only and would
    # push every request, streams included, through a thread).
    "servestatic.middleware.ServeStaticMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "negotiator.urls"
ASGI_APPLICATION = "negotiator.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL connections each process may hold (checked by llm.E003).
DATABASE_POOL_SIZE = _number("DATABASE_POOL_SIZE", 4, int)


def _database(url: str) -> tuple[dict, str]:
    """DATABASES["default"] from DATABASE_URL; for a URL Django cannot use, a dummy database
    (any query fails) and why, which llm.E011 reports, never repeating the URL (it may hold a
    password)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # django-environ's warning prints the URL, password included
            config = environ.Env.db_url_config(url)
    except ValueError:
        return {"ENGINE": "django.db.backends.dummy"}, "its port is not a number"
    if config.get("ENGINE") not in ("django.db.backends.sqlite3", "django.db.backends.postgresql"):
        return {
            "ENGINE": "django.db.backends.dummy"
        }, "it is neither a postgres:// nor a sqlite:// URL"
    return config, ""


_default, DATABASE_URL_PROBLEM = _database(
    env.str("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
)
DATABASES = {"default": _default}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL: readers never wait for the writer; synchronous=NORMAL: no fsync per commit (a power
    # cut may lose the last commits, never corrupt); IMMEDIATE: no lock upgrades that fail.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        init_command="PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        transaction_mode="IMMEDIATE",
    )
    # Async code reaches the ORM through one long-lived thread: keep its connection open
    # rather than reconnecting (and re-running the PRAGMAs) around every query.
    DATABASES["default"]["CONN_MAX_AGE"] = None
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A bounded psycopg pool per process: async code reaches the ORM through one thread, and the
    # pool keeps its connections open between calls instead of reconnecting for each.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": DATABASE_POOL_SIZE
        if isinstance(DATABASE_POOL_SIZE, int) and DATABASE_POOL_SIZE > 0
        else 4,
        "timeout": 10,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "negotiator.layers.ResilientRedisChannelLayer",
            # capacity bounds each channel's queue: a watcher that falls that far behind misses
            # frames (and is told so) while group sends to it never block the generator.
            "CONFIG": {"hosts": [REDIS_URL], "capacity": 200, "expiry": 30},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
SERVESTATIC_USE_FINDERS = True  # serve app assets without a collectstatic step

CORS_ALLOWED_ORIGINS = _words("CORS_ALLOWED_ORIGINS")

# Bodies and frames larger than this are refused with MESSAGE_TOO_LARGE.
LLM_MAX_REQUEST_BYTES = _number("LLM_MAX_REQUEST_BYTES", 1024 * 1024, int)
DATA_UPLOAD_MAX_MEMORY_SIZE = (
    LLM_MAX_REQUEST_BYTES if isinstance(LLM_MAX_REQUEST_BYTES, int) else 1024 * 1024
)

# Unsent bytes a WebSocket client may leave waiting before it is cut (close code 4008).
LLM_MAX_SEND_BUFFER_BYTES = _number("LLM_MAX_SEND_BUFFER_BYTES", 1024 * 1024, int)

API_TOKEN = env.str("API_TOKEN", default="")
# Generations per client (the API token's holder, else the IP address): "60/m", "5/s", or "off".
LLM_RATE_LIMIT = env.str("LLM_RATE_LIMIT", default="60/m")

# Where `make run` (manage.py serve) listens.
SERVE_HOST = env.str("HOST", default="127.0.0.1")
SERVE_PORT = _number("PORT", 8000, int)

# LLM providers -----------------------------------------------------------------
# Shaped like CHANNEL_LAYERS: one entry per alias, a BACKEND class and its CONFIG.

_TIMEOUT = _number("LM_STUDIO_TIMEOUT", 30)

LLM = {
    "PROVIDER": env.str("LLM_PROVIDER", default="lm_studio").strip(),
    "FALLBACK_PROVIDERS": _words("LLM_FALLBACK_PROVIDERS"),
    "LOCAL_MODEL": env.str("LLM_LOCAL_MODEL", default="auto").strip().lower(),
    "PROVIDERS": {
        "lm_studio": {
            "BACKEND": "llm.providers.lm_studio.LMStudioProvider",
            "CONFIG": {
                "base_url": env.str("LM_STUDIO_BASE_URL", default="http://localhost:1234/v1"),
                "default_model": env.str("LM_STUDIO_DEFAULT_MODEL", default=""),
                "read_timeout": _TIMEOUT,
                # auto: the form of `response_format` the server takes is found by asking.
                "response_format": env.str("LM_STUDIO_RESPONSE_FORMAT", default="auto").strip(),
            },
        },
        "openrouter": {
            "BACKEND": "llm.providers.openrouter.OpenRouterProvider",
            "CONFIG": {
                "base_url": env.str("OPENROUTER_BASE_URL", default="https://openrouter.ai/api/v1"),
                "default_model": env.str("OPENROUTER_DEFAULT_MODEL", default="openrouter/auto"),
                "api_key": env.str("OPENROUTER_API_KEY", default=""),
                "enabled": env.bool("LLM_ENABLE_OPENROUTER", default=False),
                "read_timeout": _TIMEOUT,
                "site_url": env.str("OPENROUTER_SITE_URL", default="https://github.com/negotiator"),
                "app_name": env.str("OPENROUTER_APP_NAME", default="Negotiator"),
            },
        },
    },
    # Shared by every provider unless its CONFIG says otherwise.
    "DEFAULTS": {
        "connect_timeout": _number("LLM_CONNECT_TIMEOUT", 5),
        "idle_timeout": _number("LLM_STREAM_IDLE_TIMEOUT", 60),
        "ping_timeout": _number("LLM_PING_TIMEOUT", 5),
        "max_retries": _number("LLM_MAX_RETRIES", 3, int),
        "retry_delay": _number("LLM_RETRY_DELAY", 2),
        "retry_after_max": _number("LLM_RETRY_AFTER_MAX", 60),
        "max_connections": _number("LLM_MAX_CONNECTIONS", 20, int),
        "max_keepalive": _number("LLM_MAX_KEEPALIVE", 10, int),
        "max_tokens": _number("LLM_MAX_TOKENS", 1024, int),
    },
}

# Negotiations -----------------------------------------------------------------
# Checked by negotiation.E001-E003.

# How long a negotiation waits for a person's move before it ends (`ended_by: "timeout"`).
NEGOTIATION_HUMAN_TIMEOUT = _number("NEGOTIATION_HUMAN_TIMEOUT", 300)
# `max_tokens` of a model's message in a negotiation (the `llm` policy gets room for its JSON too).
NEGOTIATION_MESSAGE_MAX_TOKENS = _number("NEGOTIATION_MESSAGE_MAX_TOKENS", 40, int)
# How the `narrated` strategy concedes unless a side says otherwise: < 1 late, 1 linearly,
# > 1 early.
NEGOTIATION_BETA = _number("NEGOTIATION_BETA", 1.0)

# Logging -----------------------------------------------------------------------

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").strip().upper()
LOG_DIR = env.str("LOG_DIR", default="")
# What logging runs with while a bad LOG_LEVEL / LOG_DIR waits for `llm.E008` to report it.
_log_level = LOG_LEVEL if LOG_LEVEL in logging.getLevelNamesMapping() else "INFO"

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact_secrets": {"()": "negotiator.logging.RedactSecrets"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_secrets"],
        },
    },
    "root": {"handlers": ["console"], "level": _log_level},
    "loggers": {
        "django": {"handlers": [], "level": _log_level, "propagate": True},
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
with contextlib.suppress(OSError):
    if LOG_DIR:
        Path(LOG_DIR).mkdir(parents=True, exist_ok=True)
if LOG_DIR and usable_log_dir(LOG_DIR):  # else llm.E009 reports it
    LOGGING["handlers"]["file"] = {
        "class": "logging.handlers.RotatingFileHandler",
        "filename": str(Path(LOG_DIR) / "negotiator.log"),
        "maxBytes": 10 * 1024 * 1024,
        "backupCount": 5,
        "formatter": "plain",
        "filters": ["redact_secrets"],
    }
    LOGGING["root"]["handlers"].append("file")

# Production hardening, on when debug is off (README, "Deploying").
if not DEBUG:
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$"]  # load balancers probe over plain HTTP
    DJANGO_HSTS_SECONDS = _number("DJANGO_HSTS_SECONDS", 0, int)  # checked by llm.E003
    SECURE_HSTS_SECONDS = DJANGO_HSTS_SECONDS if isinstance(DJANGO_HSTS_SECONDS, int) else 0
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=True)
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
    if env.bool("DJANGO_TRUST_X_FORWARDED_PROTO", default=False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SILENCED_SYSTEM_CHECKS = env.list("DJANGO_SILENCED_SYSTEM_CHECKS", default=[])
