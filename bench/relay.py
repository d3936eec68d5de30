"""The relay against the physical limit: `make bench` (or `python bench/relay.py --help`).

Every row compares, in the same run, the relay (daphne serving this project, over WebSocket and
over HTTP SSE) with a plain httpx client reading the same upstream stream directly. The upstream
is `testkit/fake_upstream.py` in its own process (token count, rate and TTFT come in the model name,
which the relay passes on) and, for one row, the real SmolLM2 server. Prints a table and writes
it as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Reading,
    Row,
    added_latency_rows,
    direct,
    machine,
    print_machine,
    print_table,
    report_missed,
    server_env,
    write_results,
)
from testkit import servers  # noqa: E402

# Clients ---------------------------------------------------------------------------------------


async def over_websocket(relay: str, model: str, **flags: bool) -> Reading:
    frame = {
        "type": "generate",
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 100000,
    }
    async with websockets.connect(
        relay.replace("http://", "ws://") + "/ws/llm/stream/", max_size=None
    ) as ws:
        reading = Reading(time.perf_counter())
        await ws.send(json.dumps(frame))
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == "token":
                reading.take(message["text"], time.perf_counter(), **flags)
            elif message["type"] in ("done", "error"):
                reading.ended = time.perf_counter()
                if message["type"] == "error":
                    raise RuntimeError(message)
                return reading


async def over_sse(client: httpx.AsyncClient, relay: str, model: str, **flags: bool) -> Reading:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 100000,
        "stream": True,
    }
    reading = Reading(time.perf_counter())
    async with client.stream("POST", relay + "/api/v1/llm/generate", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                message = json.loads(line[6:])
                if message["type"] == "token":
                    reading.take(message["text"], time.perf_counter(), **flags)
    reading.ended = time.perf_counter()
    return reading


def rate(reading: Reading) -> float:
    return reading.tokens / (reading.ended - reading.started)


# Scenarios ------------------------------------------------------------------------------------


async def fast_single_stream(relay: str, upstream: str, tokens: int, repeats: int) -> list[Row]:
    model = f"bench:tokens={tokens}"
    results: dict[str, list[float]] = {"direct": [], "websocket": [], "sse": []}
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits all three alike
            results["direct"].append(rate(await direct(client, upstream, model)))
            results["websocket"].append(rate(await over_websocket(relay, model)))
            results["sse"].append(rate(await over_sse(client, relay, model)))
    best = {name: max(values) for name, values in results.items()}
    return [
        Row(
            "1 stream, upstream as fast as it can send",
            f"relay/direct tokens/s over {face}",
            best[key],
            best["direct"],
            best[key] / best["direct"],
            ">= 0.85",
            best[key] / best["direct"] >= 0.85,
            "tokens/s",
            {"runs": results},
        )
        for face, key in (("WS", "websocket"), ("HTTP SSE", "sse"))
    ]


async def concurrent_streams(
    relay: str, upstream: str, streams: int, per_second: float, tokens: int
) -> list[Row]:
    model = f"bench:tokens={tokens},delay={1 / per_second},timestamps=1"

    async def run(kind: str) -> tuple[float, float, list[float], list[float], int]:
        """(tokens/s the upstream offered, tokens/s the client received, latencies in ms in the
        steady state and overall, tokens received)."""
        async with httpx.AsyncClient(
            timeout=120, limits=httpx.Limits(max_connections=streams)
        ) as client:
            if kind == "direct":
                readings = await asyncio.gather(
                    *(direct(client, upstream, model, timestamps=True) for _ in range(streams))
                )
            else:
                readings = await asyncio.gather(
                    *(over_websocket(relay, model, timestamps=True) for _ in range(streams))
                )
        # Per stream, between its first and last token: what the upstream offered (every token of
        # the reply), and what arrived, per second; a token lost on the way lowers the second.
        sent = sum((tokens - 1) / (r.sent[-1] - r.sent[0]) for r in readings if len(r.sent) > 1)
        received = sum(
            (len(r.sent) - 1) / (r.last_token - r.first_token) for r in readings if len(r.sent) > 1
        )
        # Steady state: once every stream has started and before any has ended (the 100 session
        # set-ups and tear-downs landing in the same instant are reported apart).
        start, end = max(r.sent[0] for r in readings), min(r.sent[-1] for r in readings)
        lags = sorted(lag * 1000 for r in readings for at, lag in zip(r.sent, r.lags, strict=True))
        steady = sorted(
            lag * 1000
            for r in readings
            for at, lag in zip(r.sent, r.lags, strict=True)
            if start <= at <= end
        )
        return sent, received, steady, lags, sum(len(r.sent) for r in readings)

    _, direct_rate, direct_steady, direct_all, _ = await run("direct")
    offered, relay_rate, relay_steady, relay_all, delivered = await run("relay")

    ratio = relay_rate / offered
    details = {
        "offered_tokens_per_s": offered,
        "tokens_measured_steady": len(relay_steady),
        "tokens_received": len(relay_all),
        "tokens_offered": streams * tokens,
    }
    scenario = f"{streams} concurrent streams at {per_second:g} tokens/s each, one worker"
    complete = delivered / (streams * tokens)
    rows = [
        Row(
            scenario,
            "delivered/offered tokens/s",
            relay_rate,
            direct_rate,
            ratio,
            ">= 0.99",
            ratio >= 0.99,
            "tokens/s",
            details,
        ),
        Row(
            scenario,
            "tokens delivered / tokens offered",
            delivered,
            streams * tokens,
            complete,
            "= 1",
            complete == 1,
            "tokens",
        ),
    ]
    rows += added_latency_rows(
        scenario,
        lambda p, name: f"added latency/token p{p}, {name} (ms)",
        [
            ("steady", relay_steady, direct_steady, 20.0),
            ("incl. start/end burst", relay_all, direct_all, None),
        ],
    )
    return rows


async def time_to_first_token(relay: str, upstream: str, ttft: float, repeats: int) -> list[Row]:
    model = f"bench:tokens=5,ttft={ttft}"
    relay_ttfts, direct_ttfts = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(repeats):
            reading = await direct(client, upstream, model)
            direct_ttfts.append((reading.first_token - reading.started) * 1000)
            reading = await over_websocket(relay, model)
            relay_ttfts.append((reading.first_token - reading.started) * 1000)
    relay_median, direct_median = statistics.median(relay_ttfts), statistics.median(direct_ttfts)
    added = relay_median - direct_median
    return [
        Row(
            f"upstream TTFT {ttft * 1000:g} ms",
            f"relay TTFT - direct TTFT, median of {repeats} (ms)",
            relay_median,
            direct_median,
            added,
            "<= 5 ms",
            added <= 5,
            "ms",
            {"relay_ms": relay_ttfts, "direct_ms": direct_ttfts},
        )
    ]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_connections(relay: str, relay_pid: int, count: int) -> list[Row]:
    url = relay.replace("http://", "ws://") + "/ws/llm/stream/"
    async with websockets.connect(url):  # warm up: the first socket loads code and caches
        pass
    await asyncio.sleep(0.5)
    before = rss_kib(relay_pid)
    sockets = []
    for start in range(0, count, 100):
        sockets += await asyncio.gather(
            *(websockets.connect(url) for _ in range(min(100, count - start)))
        )
    await asyncio.sleep(1)
    after = rss_kib(relay_pid)
    for ws in sockets:
        await ws.close()
    per = (after - before) / count
    return [
        Row(
            f"{count} open idle WebSocket connections, one worker",
            "RSS growth per connection (KiB)",
            per,
            0,
            per,
            "<= 60 KiB",
            per <= 60,
            "KiB",
            {"rss_before_kib": before, "rss_after_kib": after},
        )
    ]


async def smollm2(relay: str, upstream: str, tokens: int, repeats: int) -> list[Row]:
    """Text/s while the reply streams (after its first piece, to its last), at temperature 0 so both
    paths get the same reply: the model's own time to first token and reply length cancel out.
    Measured alike on both paths (characters, since the relay's frames may carry several tokens),
    and shown as tokens/s at the direct path's characters per token."""
    relay_rates, direct_rates, chars_per_token = [], [], []
    messages = [
        {"role": "user", "content": "Write a long, detailed story about a lighthouse keeper."}
    ]

    def streamed(pieces: list[tuple[float, str]]) -> float:
        """Characters per second after the first piece: its own arrival starts the clock."""
        return sum(len(text) for _, text in pieces[1:]) / (pieces[-1][0] - pieces[0][0])

    async def run_direct(client: httpx.AsyncClient) -> float:
        body = {"messages": messages, "stream": True, "max_tokens": tokens, "temperature": 0}
        pieces = []
        async with client.stream("POST", upstream + "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    delta = (json.loads(line[6:])["choices"] or [{}])[0].get("delta") or {}
                    if delta.get("content"):
                        pieces.append((time.perf_counter(), delta["content"]))
        chars_per_token.append(sum(len(text) for _, text in pieces) / len(pieces))
        return streamed(pieces)

    async def run_relay() -> float:
        frame = {"type": "generate", "messages": messages, "max_tokens": tokens, "temperature": 0}
        pieces = []
        async with websockets.connect(relay.replace("http://", "ws://") + "/ws/llm/stream/") as ws:
            await ws.send(json.dumps(frame))
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "token":
                    pieces.append((time.perf_counter(), message["text"]))
                elif message["type"] == "done":
                    return streamed(pieces)
                elif message["type"] == "error":
                    raise RuntimeError(message)

    async with httpx.AsyncClient(timeout=120) as client:
        await run_direct(client)  # warm the model
        for _ in range(repeats):
            direct_rates.append(await run_direct(client))
            relay_rates.append(await run_relay())
    per_token = statistics.median(chars_per_token)
    relay_rate, direct_rate = (
        statistics.median(relay_rates) / per_token,
        statistics.median(direct_rates) / per_token,
    )
    ratio = relay_rate / direct_rate
    return [
        Row(
            f"real SmolLM2, {tokens} tokens",
            "relay tokens/s / direct tokens/s",
            relay_rate,
            direct_rate,
            ratio,
            ">= 0.97",
            ratio >= 0.97,
            "tokens/s",
            {
                "relay_chars_per_s": relay_rates,
                "direct_chars_per_s": direct_rates,
                "chars_per_token": per_token,
            },
        )
    ]


# Running ---------------------------------------------------------------------------------------


async def run_backend(
    name: str,
    env_extra: dict[str, str],
    args: argparse.Namespace,
    logs: Path,
    smollm2_url: str | None,
) -> list[Row]:
    env = server_env(logs, **env_extra)
    rows: list[Row] = []
    with servers.fake_upstream(logs, "--tokens", "10") as upstream:
        env["LM_STUDIO_BASE_URL"] = upstream
        with servers.daphne_process(env, logs) as (relay, pid):
            rows += await fast_single_stream(relay, upstream, args.fast_tokens, args.repeats)
            rows += await concurrent_streams(relay, upstream, args.streams, 50, args.stream_tokens)
            rows += await time_to_first_token(relay, upstream, 0.2, 20)
            rows += await idle_connections(relay, pid, args.idle)
    if smollm2_url:
        env["LM_STUDIO_BASE_URL"] = smollm2_url
        with servers.daphne(env, logs) as relay:
            rows += await smollm2(relay, smollm2_url, 128, args.repeats)
    for row in rows:
        row.scenario = f"{row.scenario} [{name}]" if name != "sqlite" else row.scenario
    return rows


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller runs (a smoke test of the bench)"
    )
    parser.add_argument("--no-smollm2", action="store_true", help="skip the real-model row")
    parser.add_argument(
        "--no-postgres", action="store_true", help="skip the PostgreSQL + Redis rows"
    )
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    args.repeats = 2 if args.quick else 5
    args.fast_tokens = 5000 if args.quick else 30000
    args.streams = 20 if args.quick else 100
    args.stream_tokens = 50 if args.quick else 200
    args.idle = 100 if args.quick else 1000

    info = machine()
    print_machine(info)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        logs = Path(tmp)
        smollm2_url = None
        if not args.no_smollm2:
            from llm.local_model import LocalModelServer

            model = stack.enter_context(LocalModelServer(log_path=logs / "smollm2.log"))
            smollm2_url = model.base_url
        rows += await run_backend(
            "sqlite",
            {"DATABASE_URL": f"sqlite:///{logs / 'bench.sqlite3'}"},
            args,
            logs,
            smollm2_url,
        )
        print_table("SQLite + in-memory channel layer", rows)
        if not args.no_postgres:
            pg_rows = await run_backend(
                "postgres+redis",
                {"DATABASE_URL": args.database_url, "REDIS_URL": args.redis_url},
                args,
                logs,
                smollm2_url,
            )
            print_table("PostgreSQL + Redis", pg_rows)
            rows += pg_rows
    write_results("relay", {"machine": info, "quick": args.quick}, rows)
    missed = report_missed(rows)
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
