"""`bench/negotiations.py`: it starts (`--help`), and its arithmetic is right. No timing here: the
benchmark's figures come from `make bench`, never from a test."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.common import percentile
from bench.negotiations import (
    Followed,
    _take,
    lag_profile,
    move_problems,
    per_move_ms,
    start_frame,
)

ROOT = Path(__file__).resolve().parents[2]


def test_help_runs_without_starting_anything() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "negotiations.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--no-postgres", "--strict", "--no-smollm2", "--database-url"):
        assert option in result.stdout


def test_per_move_cost_is_the_wall_time_beyond_the_upstream_per_move() -> None:
    # 9 moves in 1.0 s, the upstream's own time 0.91 s: 90 ms / 9 = 10 ms a move.
    assert per_move_ms(1.0, 0.91, 9) == pytest.approx(10.0)
    assert per_move_ms(0.5, 0.5, 3) == 0
    assert per_move_ms(0.9, 1.0, 10) == pytest.approx(-10.0)  # faster than direct: shown so
    with pytest.raises(ValueError):
        per_move_ms(1.0, 0.5, 0)


def test_percentile_is_the_nearest_rank_at_or_above() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 51
    assert percentile(values, 0.99) == 100
    assert percentile(values, 0.0) == 1
    assert percentile([7.0], 0.99) == 7
    assert math.isnan(percentile([], 0.5))


def move(turn: int, **changes: Any) -> dict[str, Any]:
    base = {
        "turn": turn,
        "side": "seller" if turn % 2 else "buyer",
        "action": "offer",
        "price": 100.0 - turn,
        "message": f"move {turn}",
        "invalid": False,
        "session_id": f"s{turn}",
    }
    return base | changes


def test_moves_intact_when_frames_and_rows_match() -> None:
    moves = [move(t) for t in (1, 2, 3)]
    assert move_problems(moves, [dict(m) for m in moves], 3) == []


@pytest.mark.parametrize(
    ("seen", "stored", "expected", "problem"),
    [
        ([move(1), move(3)], [move(1), move(2), move(3)], 3, "frames: turns [1, 3]"),
        ([move(1), move(2), move(2)], [move(1), move(2)], None, "frames: turns [1, 2, 2]"),
        ([move(2), move(1)], [move(1), move(2)], None, "frames: turns [2, 1]"),
        ([move(1), move(2)], [move(1), move(2), move(3)], None, "2 moves seen, 3 stored"),
        ([move(1)], [move(1, price=1.0)], None, "turn 1: price differ"),
        ([move(1)], [move(1, message="other")], None, "turn 1: message differ"),
        ([move(1)], [move(1)], 9, "1 moves stored, 9 expected"),
        ([move(1)], [move(2)], None, "stored: turns [2]"),
    ],
)
def test_a_lost_doubled_or_changed_move_is_named(
    seen: list[dict[str, Any]], stored: list[dict[str, Any]], expected: int | None, problem: str
) -> None:
    assert any(p.startswith(problem) for p in move_problems(seen, stored, expected)), move_problems(
        seen, stored, expected
    )


def test_lag_profile_keeps_the_steady_state_apart() -> None:
    # Two negotiations: the steady state is from the later first send (2.0) to the earlier last
    # send (4.0); latencies are reported in ms, sorted.
    first = ([1.0, 2.0, 3.0, 4.0], [0.001, 0.002, 0.003, 0.050])
    second = ([2.0, 3.0, 4.0, 5.0], [0.004, 0.005, 0.006, 0.100])
    steady, overall = lag_profile([first, second, ([], [])])
    assert steady == pytest.approx([2.0, 3.0, 4.0, 5.0, 6.0, 50.0])
    assert overall == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 50.0, 100.0])
    assert lag_profile([]) == ([], [])


async def test_a_sockets_frames_make_its_moves_tokens_and_latencies() -> None:
    followed = Followed(started=10.0)
    frames: list[dict[str, Any]] = [
        {
            "type": "negotiation",
            "negotiation_id": "n1",
            "status": "running",
            "moves": [move(1)],
            "live": {"turn": 2, "side": "buyer", "text": " t0| t1|"},
        },
        {"type": "token", "turn": 2, "side": "buyer", "text": " t2|1.0 t3|1.5"},
        {"type": "move", "negotiation_id": "n1", **move(2)},
        {"type": "turn", "turn": 3, "side": "seller"},
        {"type": "end", "status": "deal"},
    ]
    results = [await _take(followed, orjson.dumps(f), True, None) for f in frames]
    assert results == [True, True, True, True, False]
    assert followed.negotiation_id == "n1"
    assert followed.snapshot_moves == 1 and followed.live_tokens == 2
    assert [m["turn"] for m in followed.moves] == [1, 2]
    assert followed.reading.tokens == 2 and followed.reading.sent == [1.0, 1.5]
    assert set(followed.move_at) == {2} and set(followed.turn_at) == {3}
    assert followed.status == "deal"


def test_the_start_frame_plays_narrated_against_narrated_on_the_given_model() -> None:
    frame = start_frame("bench:tokens=3")
    assert frame["type"] == "start" and frame["max_turns"] == 10
    for side in ("buyer", "seller"):
        assert frame[side] == {"policy": "narrated", "model": "bench:tokens=3"}
