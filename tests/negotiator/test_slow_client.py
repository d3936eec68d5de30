"""A WebSocket client that stops reading is cut (close code 4008) and slows nobody else."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from testkit import servers
from tests.raw_websocket import close_code, logged_at, open_stalled_socket

LIMIT = 64 * 1024
# For the client that stops reading: 80 MB at about 4 MB/s, a rate that fills any buffer in about
# a second without taking the CPU from the other streams.
FLOOD = "bench:tokens=20000,size=4096,delay=0.001"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    logs = tmp_path_factory.mktemp("slow-client")
    with servers.fake_upstream(logs, "--tokens", "10") as upstream:
        env = servers.project_env(
            logs,
            LM_STUDIO_BASE_URL=upstream,
            LLM_MAX_TOKENS="1000000",
            LLM_MAX_SEND_BUFFER_BYTES=str(LIMIT),
        )
        with servers.daphne_process(env, logs) as (base, pid):
            yield base, pid, logs / f"daphne-{base.rsplit(':', 1)[1]}.log"


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


async def normal_stream(base: str) -> tuple[float, str]:
    async with websockets.connect(
        base.replace("http://", "ws://") + "/ws/llm/stream/", max_size=None
    ) as ws:
        started = time.perf_counter()
        await ws.send(
            json.dumps(
                {
                    "type": "generate",
                    "model": "bench:tokens=2000",
                    "messages": [{"role": "user", "content": "Hi"}],
                }
            )
        )
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] in ("done", "error"):
                return time.perf_counter() - started, frame["type"]


@pytest.mark.timeout(90)
async def test_a_client_that_stops_reading_is_cut_and_slows_no_one(
    site: tuple[str, int, Path],
) -> None:
    base, pid, log = site
    alone, end = await normal_stream(base)
    assert end == "done"
    before = rss_kib(pid)
    cancelled_before = await cancelled_count(base)  # on PostgreSQL the database outlives the run

    # Other clients stream as fast as alone while the slow one is being filled and cut.
    slow = open_stalled_socket(
        base, {"type": "generate", "model": FLOOD, "messages": [{"role": "user", "content": "Hi"}]}
    )
    durations = [await normal_stream(base) for _ in range(3)]
    assert all(end == "done" for _, end in durations)
    assert max(duration for duration, _ in durations) < alone * 3 + 0.5, (durations, alone)

    deadline = time.monotonic() + 30
    while "reads too slowly" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert "reads too slowly" in log.read_text(errors="replace"), "the slow client was never cut"
    # Its memory stayed bounded: the whole reply, buffered, would be 80 MB (what Python keeps of the
    # other streams and of the text generated before the cut makes up the rest).
    grew_kib = rss_kib(pid) - before
    assert grew_kib < 32 * 1024, grew_kib

    # Its generation stops at the cut (not when the close handshake with a client that does not
    # read times out, a second later) and is stored `cancelled`.
    for _ in range(50):
        if await cancelled_count(base) > cancelled_before:
            break
        await asyncio.sleep(0.1)
    assert await cancelled_count(base) > cancelled_before, (
        "the slow client's generation was not stored as cancelled"
    )
    cut, closed = logged(log, "reads too slowly"), logged(log, "outcome=closed-by-caller")
    assert 0 <= closed - cut < 0.05, (cut, closed)  # milliseconds: the app is told at the cut

    # Reading now: what was queued for it, then the close frame (4008), unless the server already
    # dropped the connection after its close handshake timed out (a reset).
    slow.setblocking(False)
    received, reset = b"", False
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        try:
            chunk = slow.recv(1 << 20)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            reset = True
            break
        if not chunk:
            break
        received += chunk
    slow.close()
    assert close_code(received) == 4008 or reset


def logged(log: Path, text: str) -> float:
    """The time of the first log line holding `text`, in seconds since the epoch."""
    return logged_at(
        next(line for line in log.read_text(errors="replace").splitlines() if text in line)
    )


async def cancelled_count(base: str) -> int:
    async with httpx.AsyncClient(base_url=base) as http:
        return (
            await http.get("/api/v1/sessions", params={"status": "cancelled", "page_size": 1})
        ).json()["count"]
