"""What the benchmarks share (`bench/relay.py`, `bench/negotiations.py`): the row, the direct
client on the upstream, the token arithmetic, the server environment, the table and the results.

Kept free of `tests/`: the servers and the fake upstream come from `testkit/`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testkit import servers  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@dataclass
class Row:
    scenario: str
    figure: str
    relay: float
    direct: float
    value: float  # the figure compared with its target
    target: str
    met: bool
    unit: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# Tokens of the fake upstream: " t<i>", with "|<send time>" after each when `timestamps=1` --------


def count_tokens(text: str) -> int:
    return text.count(" t")


def stamps(text: str) -> list[float]:
    return [float(part.split(" ", 1)[0]) for part in text.split("|")[1:]]


def percentile(values: list[float], q: float) -> float:
    """The nearest rank at or above `q` of sorted `values` (NaN when there is none)."""
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def added_latency_rows(
    scenario: str,
    figure: Callable[[int, str], str],
    series: list[tuple[str, list[float], list[float], float | None]],
    *,
    details: Callable[[list[float]], dict[str, Any]] = lambda lags: {},
) -> list[Row]:
    """Per-token latency added by the server at p50 and p99: for each `(name, through the server,
    direct, p99 target or None)`, the server's percentile minus the direct client's (same run)."""
    rows = []
    for name, relay_lags, direct_lags, target in series:
        for q in (0.50, 0.99):
            added = percentile(relay_lags, q) - percentile(direct_lags, q)
            limit = target if q == 0.99 else None
            rows.append(
                Row(
                    scenario,
                    figure(int(q * 100), name),
                    percentile(relay_lags, q),
                    percentile(direct_lags, q),
                    added,
                    f"<= {limit:g} ms" if limit else "-",
                    added <= limit if limit else True,
                    "ms",
                    details(relay_lags) if q == 0.5 else {},
                )
            )
    return rows


@dataclass
class Reading:
    started: float
    first_token: float = 0.0
    last_token: float = 0.0
    ended: float = 0.0
    tokens: int = 0
    sent: list[float] = field(default_factory=list)  # upstream send times embedded in the tokens
    lags: list[float] = field(default_factory=list)  # receive time - send time, per token

    def take(self, text: str, now: float, *, timestamps: bool = False) -> None:
        if not self.first_token:
            self.first_token = now
        self.last_token = now
        self.tokens += count_tokens(text)
        if timestamps:
            sent = stamps(text)
            self.sent += sent
            self.lags += [now - at for at in sent]


async def direct(client: httpx.AsyncClient, upstream: str, model: str, **flags: bool) -> Reading:
    """A plain httpx client on the upstream: one request, `aiter_lines`, JSON per event."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 100000,
    }
    reading = Reading(time.perf_counter())
    async with client.stream("POST", upstream + "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            text = (choices[0].get("delta") or {}).get("content")
            if text:
                reading.take(text, time.perf_counter(), **flags)
    reading.ended = time.perf_counter()
    return reading


# Servers ----------------------------------------------------------------------------------------


def server_env(logs: Path, **extra: str) -> dict[str, str]:
    """Production settings (debug off: no per-query SQL logging), served over plain HTTP here; a
    pool of 400 upstream connections, since each of the 100 concurrent streams holds one (the
    default of 20 would queue the other 80), and warnings only (one INFO line per request)."""
    return servers.project_env(
        logs,
        **extra,
        LLM_MAX_CONNECTIONS="400",
        LLM_MAX_KEEPALIVE="400",
        LOG_LEVEL="WARNING",
        LLM_MAX_TOKENS="100000",
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY="bench-" + "x" * 50,
        DJANGO_SECURE_SSL_REDIRECT="false",
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
    )


# Reporting --------------------------------------------------------------------------------------


def machine(
    packages: tuple[str, ...] = ("django", "channels", "daphne", "httpx", "orjson"),
) -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in packages},
    }


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"machine: {info['cores']} cores, {info['cpu']}, Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    )


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    header = (
        f"{'scenario':<52} {'figure':<42} {'relay':>10} {'direct':>10} {'value':>8}  "
        f"{'target':<10} met"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.scenario[:52]:<52} {row.figure[:42]:<42} {row.relay:>10.1f} {row.direct:>10.1f} "
            f"{row.value:>8.3f}  {row.target:<10} {'yes' if row.met else 'NO'}"
        )


def write_results(name: str, document: dict[str, Any], rows: list[Row]) -> Path:
    """`bench/results/<name>-<UTC timestamp>.json`: `document` and the rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_bytes(
        orjson.dumps(
            {**document, "rows": [asdict(r) for r in rows]},
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"\nwritten: {path.relative_to(ROOT)}")
    return path


def report_missed(rows: list[Row]) -> list[str]:
    """Print a MISSED line per row whose target was missed; the lines."""
    missed = [
        f"{row.scenario}: {row.figure} = {row.value:.3f} (target {row.target})"
        for row in rows
        if not row.met
    ]
    for line in missed:
        print(f"MISSED {line}")
    return missed
