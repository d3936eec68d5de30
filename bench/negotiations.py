"""Negotiations at scale against the fake upstream: `make bench` (or `bench/negotiations.py -h`).

Narrated buyer against narrated seller (library scenario 0, `max_turns` 10: a deal on turn 9),
started over `/ws/negotiations/` on daphne with production settings, each side's model a spec of
`testkit/fake_upstream.py` (`bench:tokens=..,delay=..`), which runs in its own process. Every row
compares, in the same run, the negotiations with a plain httpx client reading the same replies of
the same upstream directly, one reply after the other as the negotiation asks for them:

- orchestration cost per move: a negotiation's wall time (start frame sent -> `end` frame read)
  minus the upstream's own time for its replies (the direct client's, read just before it),
  divided by its moves; split into the part inside each generation (`turn` -> `move` frame, minus
  the upstream's time for a reply) and the rest (outside generations). What it includes, per
  move: the prompt built and the move decided (the concession strategy); the generation's
  bookkeeping (its `llm` session created in one transaction while the upstream request starts,
  and closed, the reply and usage written, before the move goes on; its broadcaster's set-up);
  connecting to the upstream and relaying each token (coalesced at 10 ms) as a `token` frame;
  the rule check; the move stored (one transaction: its row and the negotiation's `updated_at`);
  the `turn`, `token` and `move` frames to the socket; and, spread over the moves, the start
  (validation, the negotiation row, the snapshot) and the end (the row finished, `end` frame);
- 100 negotiations at once on one worker at 50 tokens/s: all end, no move lost (frames and stored
  rows, read back through the API), no token lost, and the added latency per token (send time at
  the upstream, carried in the text, to receipt) against the direct client's;
- the same on PostgreSQL + Redis, started on worker A and each watched from worker B.

Prints the tables and writes them as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Reading,
    Row,
    added_latency_rows,
    count_tokens,
    direct,
    machine,
    percentile,
    print_machine,
    print_table,
    report_missed,
    server_env,
    write_results,
)
from testkit import servers  # noqa: E402

# Library scenario 0 (budget 0.8 x list): two narrated sides, max_turns 10, make a deal on turn 9.
SCENARIO = 0
MAX_TURNS = 10
# The fields of a move as the frames, the snapshot and the API show it.
MOVE_FIELDS = ("turn", "side", "action", "price", "message", "invalid", "session_id")
ENDED = ("deal", "no_deal")
# A move's message at the production default of NEGOTIATION_MESSAGE_MAX_TOKENS, set so here.
REPLY_TOKENS = 40
# The longest a socket waits for a negotiation's end (it normally takes seconds).
FOLLOW_TIMEOUT = 60.0


# Pure arithmetic ---------------------------------------------------------------------------------


def per_move_ms(wall: float, upstream: float, moves: int) -> float:
    """What a negotiation added to its upstream's own time, per move, in ms: (wall - upstream) /
    moves, both in seconds."""
    if moves <= 0:
        raise ValueError("a negotiation without a move has no cost per move")
    return (wall - upstream) / moves * 1000


def move_problems(
    seen: list[dict[str, Any]], stored: list[dict[str, Any]], expected: int | None = None
) -> list[str]:
    """What is wrong with the moves a socket saw (its snapshot's and its `move` frames) against
    the stored ones: a turn missing, doubled or out of order, a field that differs, or (when
    `expected` is given) another count. Empty when all is well."""
    problems = []
    for name, moves in (("frames", seen), ("stored", stored)):
        turns = [move.get("turn") for move in moves]
        if turns != list(range(1, len(moves) + 1)):
            problems.append(f"{name}: turns {turns} are not 1..{len(moves)}")
    if len(seen) != len(stored):
        problems.append(f"{len(seen)} moves seen, {len(stored)} stored")
    for got, kept in zip(seen, stored, strict=False):
        differ = [key for key in MOVE_FIELDS if got.get(key) != kept.get(key)]
        if differ:
            problems.append(f"turn {kept.get('turn')}: {', '.join(differ)} differ from the stored")
    if expected is not None and len(stored) != expected:
        problems.append(f"{len(stored)} moves stored, {expected} expected")
    return problems


def lag_profile(streams: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """Per-token latencies in ms, sorted: (in the steady state, overall). Each stream is one
    negotiation's (send times, latencies), both in seconds; the steady state is from when every
    stream has sent its first token to when the first stream sent its last, so the burst of all
    starting and ending together is reported apart."""
    live = [(sent, lags) for sent, lags in streams if sent]
    if not live:
        return [], []
    start = max(sent[0] for sent, _ in live)
    end = min(sent[-1] for sent, _ in live)
    overall = sorted(lag * 1000 for _, lags in live for lag in lags)
    steady = sorted(
        lag * 1000
        for sent, lags in live
        for at, lag in zip(sent, lags, strict=True)
        if start <= at <= end
    )
    return steady, overall


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# Clients ----------------------------------------------------------------------------------------


@dataclass
class Followed:
    """One negotiation as one socket saw it (the starter's, or a watcher's)."""

    started: float  # the start (or watch) frame sent
    negotiation_id: str = ""
    snapshot_at: float = 0.0  # its `negotiation` frame read
    snapshot_moves: int = 0  # moves already in that frame
    live_tokens: int = 0  # tokens of the move being written, in that frame
    moves: list[dict[str, Any]] = field(default_factory=list)  # the snapshot's, then move frames
    turn_at: dict[int, float] = field(default_factory=dict)  # first `turn` frame of each turn
    move_at: dict[int, float] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    ended: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)
    reading: Reading = field(default_factory=lambda: Reading(0.0))  # the token frames

    @property
    def status(self) -> str:
        if self.end is not None:
            return str(self.end.get("status"))
        return "error" if self.errors else "timeout"

    @property
    def wall(self) -> float:
        return self.ended - self.started


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws/negotiations/"


def start_frame(model: str) -> dict[str, Any]:
    side = {"policy": "narrated", "model": model}
    return {
        "type": "start",
        "scenario": SCENARIO,
        "max_turns": MAX_TURNS,
        "buyer": side,
        "seller": dict(side),
    }


async def follow(
    base: str,
    first: dict[str, Any],
    *,
    timestamps: bool = False,
    on_id: Callable[[str], None] | None = None,
) -> Followed:
    """Open a socket, send `first` (start or watch), and read the negotiation's frames to its end
    (or an error, or FOLLOW_TIMEOUT)."""
    async with websockets.connect(ws_url(base), max_size=None, open_timeout=60) as ws:
        followed = Followed(time.perf_counter())
        followed.reading.started = followed.started
        await ws.send(orjson.dumps(first).decode())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FOLLOW_TIMEOUT):
                while await _take(followed, await ws.recv(), timestamps, on_id):
                    pass
        return followed


async def _take(
    followed: Followed,
    raw: str | bytes,
    timestamps: bool,
    on_id: Callable[[str], None] | None,
) -> bool:
    """Take one frame; False once the negotiation is over for this socket."""
    now = time.perf_counter()
    frame = orjson.loads(raw)
    kind = frame["type"]
    if kind == "token":
        followed.reading.take(frame["text"], now, timestamps=timestamps)
    elif kind == "turn":
        followed.turn_at.setdefault(frame["turn"], now)
    elif kind == "move":
        followed.moves.append({key: frame.get(key) for key in MOVE_FIELDS})
        followed.move_at[frame["turn"]] = now
    elif kind == "negotiation":
        followed.negotiation_id, followed.snapshot_at = frame["negotiation_id"], now
        followed.moves = [{key: move.get(key) for key in MOVE_FIELDS} for move in frame["moves"]]
        followed.snapshot_moves = len(frame["moves"])
        live = frame.get("live")
        followed.live_tokens = count_tokens(live["text"]) if live else 0
        if on_id is not None:
            on_id(followed.negotiation_id)
        if frame["status"] != "running":  # over before this socket followed it
            followed.end, followed.ended = frame, now
            return False
    elif kind == "end":
        followed.end, followed.ended = frame, now
        return False
    elif kind == "error":
        followed.errors.append(frame)
        return False
    return True


async def direct_negotiation(
    client: httpx.AsyncClient, upstream: str, model: str, replies: int, *, timestamps: bool
) -> list[Reading]:
    """What a negotiation asks of the upstream, read directly: `replies` replies, one after the
    other."""
    return [await direct(client, upstream, model, timestamps=timestamps) for _ in range(replies)]


async def stored_moves(client: httpx.AsyncClient, base: str, negotiation_id: str) -> Any:
    """The negotiation as the API reads it back from the database (its moves, its status)."""
    response = await client.get(f"{base}/api/v1/negotiations/{negotiation_id}")
    response.raise_for_status()
    return response.json()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Scenarios --------------------------------------------------------------------------------------


async def warm_up(relay: str, model: str) -> int:
    """One negotiation (code loaded, connections open); its number of moves, which every later
    negotiation of the scenario repeats (the narrated strategy is deterministic)."""
    followed = await follow(relay, start_frame(model))
    if followed.status not in ENDED:
        raise RuntimeError(f"the warm-up negotiation ended {followed.status}: {followed.errors}")
    return len(followed.moves)


async def orchestration(
    relay: str, upstream: str, pid: int, count: int, moves: int, tokens: int, delay: float
) -> list[Row]:
    """`count` negotiations one at a time, each after a direct client read the same replies."""
    model = f"bench:tokens={tokens},delay={delay:g}"
    costs, walls, upstreams, inside, between, snapshots = [], [], [], [], [], []
    replies, generations = [], []
    cpu = 0.0
    total_moves = 0
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(count):
            readings = await direct_negotiation(client, upstream, model, moves, timestamps=False)
            durations = [r.ended - r.started for r in readings]
            before = cpu_seconds(pid)
            followed = await follow(relay, start_frame(model))
            cpu += cpu_seconds(pid) - before
            if followed.status not in ENDED:
                raise RuntimeError(f"a negotiation ended {followed.status}: {followed.errors}")
            n = len(followed.moves)
            total_moves += n
            # The upstream's own time for n replies: the direct client's n, read just before.
            own = sum(durations) if n == moves else statistics.mean(durations) * n
            # turn -> move of each generation whose `turn` frame this socket got (a move being
            # written when the snapshot was taken is in the snapshot instead).
            spans = [
                followed.move_at[t] - followed.turn_at[t]
                for t in followed.move_at
                if t in followed.turn_at
            ]
            costs.append(per_move_ms(followed.wall, own, n))
            walls.append(followed.wall / n * 1000)
            upstreams.append(own / n * 1000)
            # Per move, inside a generation (its span minus the upstream's own time for a reply),
            # and the rest of the cost: outside them (the start, move -> next turn, the end).
            in_generation = (statistics.mean(spans) - own / n) * 1000
            inside.append(in_generation)
            between.append(costs[-1] - in_generation)
            snapshots.append((followed.snapshot_at - followed.started) * 1000)
            replies += [d * 1000 for d in durations]
            generations += [s * 1000 for s in spans]
    scenario = f"1 negotiation at a time ({moves} moves, {tokens} tokens/reply)"
    sorted_costs = sorted(costs)
    details = {
        "model": model,
        "negotiations": count,
        "moves": total_moves,
        "per_move_ms": costs,
        "wall_per_move_ms": walls,
        "upstream_per_move_ms": upstreams,
        "direct_reply_ms": replies,
        "turn_to_move_ms": generations,
        "start_to_snapshot_ms": snapshots,
    }
    cpu_per_move = cpu / total_moves * 1000
    return [
        Row(
            scenario,
            f"orchestration/move, median of {count} (ms)",
            median(walls),
            median(upstreams),
            median(costs),
            "<= 5 ms",
            median(costs) <= 5,
            "ms",
            details,
        ),
        Row(
            scenario,
            "orchestration/move, p95 (ms)",
            percentile(sorted(walls), 0.95),
            percentile(sorted(upstreams), 0.95),
            percentile(sorted_costs, 0.95),
            "-",
            True,
            "ms",
        ),
        Row(
            scenario,
            "of which in generation: turn->move (ms)",
            median(generations),
            median(replies),
            median(inside),
            "-",
            True,
            "ms",
        ),
        Row(
            scenario,
            "of which outside generations (ms)",
            median(costs),
            median(inside),
            median(between),
            "-",
            True,
            "ms",
        ),
        Row(
            scenario,
            "daphne CPU per move (ms)",
            cpu_per_move,
            0,
            cpu_per_move,
            "-",
            True,
            "ms",
            {"cpu_seconds": cpu},
        ),
    ]


@dataclass
class Crowd:
    """Many negotiations at once: the starters' sockets, the watchers' (if any), and the API."""

    starters: list[Followed]
    watchers: list[Followed]
    stored: dict[str, Any]  # negotiation id -> the API's reading
    cpu: list[float]  # each worker's CPU seconds over the run (the starting one first)


async def crowd(
    start_on: str, watch_on: str | None, pids: list[int], count: int, model: str
) -> Crowd:
    """Start `count` negotiations at once on `start_on`, each on its own socket; with `watch_on`,
    each is also watched from a socket of that worker as soon as its id is known."""
    watching: list[asyncio.Task[Followed]] = []

    def watch(negotiation_id: str) -> None:
        if watch_on is not None:
            frame = {"type": "watch", "negotiation_id": negotiation_id}
            watching.append(asyncio.create_task(follow(watch_on, frame, timestamps=True)))

    before = [cpu_seconds(pid) for pid in pids]
    starters = await asyncio.gather(
        *(follow(start_on, start_frame(model), timestamps=True, on_id=watch) for _ in range(count))
    )
    watchers = list(await asyncio.gather(*watching))
    cpu = [cpu_seconds(pid) - then for pid, then in zip(pids, before, strict=True)]
    stored = {}
    async with httpx.AsyncClient(timeout=60) as client:
        for followed in starters:
            if followed.negotiation_id:
                stored[followed.negotiation_id] = await stored_moves(
                    client, watch_on or start_on, followed.negotiation_id
                )
    return Crowd(list(starters), watchers, stored, cpu)


async def direct_crowd(
    upstream: str, count: int, model: str, moves: int
) -> tuple[list[tuple[list[float], list[float]]], list[float]]:
    """`count` direct clients at once, each reading `moves` replies one after the other: per
    client, (send times, latencies), and its wall time (first request to last reply's end)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=count)) as client:
        runs = await asyncio.gather(
            *(
                direct_negotiation(client, upstream, model, moves, timestamps=True)
                for _ in range(count)
            )
        )
    streams = [
        ([at for r in readings for at in r.sent], [lag for r in readings for lag in r.lags])
        for readings in runs
    ]
    return streams, [readings[-1].ended - readings[0].started for readings in runs]


def crowd_rows(
    scenario: str,
    label: str,
    sockets: list[Followed],
    stored: dict[str, Any],
    direct_streams: list[tuple[list[float], list[float]]],
    count: int,
    moves: int,
    tokens: int,
) -> list[Row]:
    """The rows of one side's sockets (the starters', or the watchers'): ended, moves, tokens,
    added latency."""
    ended = [f for f in sockets if f.status in ENDED]
    problems: dict[str, list[str]] = {}
    for followed in sockets:
        reading = stored.get(followed.negotiation_id)
        if reading is None:
            problems[followed.negotiation_id or "?"] = [f"not stored ({followed.status})"]
            continue
        found = move_problems(followed.moves, reading["moves"], moves)
        if reading["status"] not in ENDED:
            found.append(f"stored {reading['status']}")
        if found:
            problems[followed.negotiation_id] = found
    intact = len(sockets) - len(problems)
    # Every token of the moves a socket followed live to the end: its token frames, and the text
    # of the move being written when its snapshot was taken (a socket cut short by an error is
    # counted in the rows above; the move it was in holds a part of its tokens).
    whole = [f for f in sockets if f.status in ENDED]
    offered = sum((len(f.moves) - f.snapshot_moves) * tokens for f in whole)
    delivered = sum(f.reading.tokens + f.live_tokens for f in whole)
    steady, overall = lag_profile([(f.reading.sent, f.reading.lags) for f in sockets])
    direct_steady, direct_overall = lag_profile(direct_streams)
    rows = [
        Row(
            scenario,
            f"{label}: ended deal/no_deal / started",
            len(ended),
            count,
            len(ended) / count,
            "= 1",
            len(ended) == count,
            "negotiations",
            {"statuses": sorted({f.status for f in sockets}), "errors": _errors(sockets)},
        ),
        Row(
            scenario,
            f"{label}: moves intact (frames = DB, 1..n)",
            intact,
            count,
            intact / count,
            "= 1",
            intact == count,
            "negotiations",
            {"problems": dict(list(problems.items())[:10]), "moves_each": moves},
        ),
        Row(
            scenario,
            f"{label}: tokens delivered / offered",
            delivered,
            offered,
            delivered / offered if offered else float("nan"),
            "= 1",
            delivered == offered,
            "tokens",
            {"sockets": len(whole), "tokens_in_snapshots": sum(f.live_tokens for f in whole)},
        ),
    ]
    rows += added_latency_rows(
        scenario,
        lambda p, name: f"{label}: added ms/token p{p}, {name}",
        [
            ("steady", steady, direct_steady, 20.0),
            ("incl. start/end", overall, direct_overall, None),
        ],
        details=lambda lags: {"tokens_measured": len(lags)},
    )
    return rows


def _errors(sockets: list[Followed]) -> dict[str, int]:
    """How many sockets ended on each error code (`timeout`: neither an end nor an error)."""
    codes = [str(f.errors[-1].get("code")) if f.errors else f.status for f in sockets]
    return dict(Counter(code for code in codes if code not in ENDED))


async def at_once(
    start_on: str,
    watch_on: str | None,
    upstream: str,
    pids: list[int],
    count: int,
    moves: int,
    tokens: int,
    per_second: float,
) -> list[Row]:
    model = f"bench:tokens={tokens},delay={1 / per_second:g},timestamps=1"
    direct_streams, direct_walls = await direct_crowd(upstream, count, model, moves)
    run = await crowd(start_on, watch_on, pids, count, model)
    where = "one worker" if watch_on is None else "on A, watched from B"
    scenario = f"{count} negotiations at once, {per_second:g} tokens/s, {where}"
    rows = crowd_rows(
        scenario,
        "A" if watch_on else "starters",
        run.starters,
        run.stored,
        direct_streams,
        count,
        moves,
        tokens,
    )
    if watch_on is not None:
        rows += crowd_rows(
            scenario, "B watchers", run.watchers, run.stored, direct_streams, count, moves, tokens
        )
    # Under load: each negotiation's wall time against a direct client's reading its replies.
    walls = [f.wall for f in run.starters if f.status in ENDED]
    done_moves = sum(len(f.moves) for f in run.starters if f.status in ENDED)
    rows.append(
        Row(
            scenario,
            "wall time/move, median (ms)",
            median(walls) / moves * 1000,
            median(direct_walls) / moves * 1000,
            (median(walls) - median(direct_walls)) / moves * 1000,
            "-",
            True,
            "ms",
            {"model": model},
        )
    )
    for name, cpu in zip(("A", "B") if watch_on else ("worker",), run.cpu, strict=True):
        per_move = cpu / max(done_moves, 1) * 1000
        rows.append(
            Row(
                scenario,
                f"{name} CPU per move (ms)",
                per_move,
                0,
                per_move,
                "-",
                True,
                "ms",
                {"cpu_seconds": cpu, "moves": done_moves},
            )
        )
    return rows


# Running ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def own_database(url: str) -> Iterator[str]:
    """A database of our own on the PostgreSQL server of `url`, dropped at the end: its URL."""
    import psycopg

    admin_url = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    name = f"negotiator_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def run_sqlite(args: argparse.Namespace, logs: Path) -> list[Row]:
    env = server_env(
        logs,
        DATABASE_URL=f"sqlite:///{logs / 'negotiations.sqlite3'}",
        NEGOTIATION_MESSAGE_MAX_TOKENS=str(REPLY_TOKENS),
    )
    rows: list[Row] = []
    with servers.fake_upstream(logs) as upstream:
        env["LM_STUDIO_BASE_URL"] = upstream
        with servers.daphne_process(env, logs) as (relay, pid):
            moves = await warm_up(relay, args.orchestration_model)
            rows += await orchestration(
                relay, upstream, pid, args.sequential, moves, *args.orchestration_reply
            )
            rows += await at_once(
                relay, None, upstream, [pid], args.at_once, moves, args.crowd_tokens, 50
            )
    return rows


async def run_postgres(args: argparse.Namespace, logs: Path) -> list[Row]:
    rows: list[Row] = []
    with own_database(args.database_url) as database_url:
        env = server_env(
            logs,
            DATABASE_URL=database_url,
            REDIS_URL=args.redis_url,
            NEGOTIATION_MESSAGE_MAX_TOKENS=str(REPLY_TOKENS),
        )
        with servers.fake_upstream(logs) as upstream:
            env["LM_STUDIO_BASE_URL"] = upstream
            with (
                servers.daphne_process(env, logs) as (worker_a, pid_a),
                servers.daphne_process(env, logs, migrate=False) as (worker_b, pid_b),
            ):
                moves = await warm_up(worker_a, args.orchestration_model)
                await warm_up(worker_b, args.orchestration_model)
                rows += await orchestration(
                    worker_a, upstream, pid_a, args.sequential, moves, *args.orchestration_reply
                )
                rows += await at_once(
                    worker_a,
                    worker_b,
                    upstream,
                    [pid_a, pid_b],
                    args.at_once,
                    moves,
                    args.crowd_tokens,
                    50,
                )
    for row in rows:
        row.scenario = f"{row.scenario} [postgres+redis]"
    return rows


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Negotiations at scale against the fake upstream (bench/negotiations.py)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller runs (a smoke test of the bench)"
    )
    parser.add_argument(
        "--no-postgres", action="store_true", help="skip the PostgreSQL + Redis rows"
    )
    parser.add_argument(
        "--no-smollm2", action="store_true", help="accepted as relay.py takes it (no model here)"
    )
    parser.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/test",
        help="the PostgreSQL server to use (a database of our own is created there and dropped)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    args.sequential = 4 if args.quick else 15
    args.at_once = 20 if args.quick else 100
    args.crowd_tokens = REPLY_TOKENS  # 0.8 s a reply at 50 tokens/s
    args.orchestration_reply = (20, 0.005)  # tokens, seconds between them: ~0.1 s a reply
    args.orchestration_model = "bench:tokens={},delay={:g}".format(*args.orchestration_reply)

    info = machine(("django", "channels", "channels_redis", "daphne", "httpx", "websockets"))
    print_machine(info)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        rows += await run_sqlite(args, logs)
        print_table("Negotiations: SQLite + in-memory channel layer, one worker", rows)
        if not args.no_postgres:
            pg_rows = await run_postgres(args, logs)
            print_table(
                "Negotiations: PostgreSQL + Redis, two workers (A starts, B watches)", pg_rows
            )
            rows += pg_rows
    write_results(
        "negotiations",
        {
            "machine": info,
            "quick": args.quick,
            "settings": {
                "scenario": SCENARIO,
                "max_turns": MAX_TURNS,
                "orchestration_model": args.orchestration_model,
                "sequential": args.sequential,
                "at_once": args.at_once,
                "crowd_tokens": args.crowd_tokens,
            },
        },
        rows,
    )
    missed = report_missed(rows)
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
