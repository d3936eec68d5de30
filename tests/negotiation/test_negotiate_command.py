"""`manage.py negotiate`: one negotiation streamed to the terminal, on the fake upstream.

The command runs its own event loop (`asyncio.run`), so each test calls it in a thread while the
fake upstream serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.core.serializers.json import DjangoJSONEncoder

from negotiation import service
from negotiation.models import Negotiation
from testkit.fake_upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]

ROOT = Path(__file__).resolve().parents[2]
CUSTOM = ["--item", "Road bike", "--list-price", "400", "--budget", "321.37", "--cost", "243.19"]
ANSI = re.compile(r"\x1b\[")


class Recorder(io.StringIO):
    """A stdout that keeps each write apart (to see text arrive piece by piece)."""

    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.tty = tty
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def isatty(self) -> bool:
        return self.tty


async def negotiate(*args: str, stdout: io.StringIO | None = None) -> tuple[int, str, str]:
    """Run the command in a thread: (exit status, stdout, stderr)."""
    out, err = stdout or io.StringIO(), io.StringIO()

    def call() -> int:
        try:
            call_command("negotiate", *args, stdout=out, stderr=err)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        return 0

    code = await asyncio.to_thread(call)
    return code, out.getvalue(), err.getvalue()


def lines_of(side: str, out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{side}:")]


# Runs to an outcome --------------------------------------------------------------------------


async def test_a_library_scenario_runs_to_an_outcome_with_its_metrics(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=["Fair", " enough", "."])
    code, out, err = await negotiate("--scenario", "3", "--max-turns", "6")
    assert code == 0, out + err
    row = await Negotiation.objects.aget()
    assert row.scenario_index == 3 and row.status in ("deal", "no_deal")
    assert row.item_title in out
    assert f"Negotiation {row.pk}" in out
    outcome = re.search(
        r"^Outcome: +(deal at \$[\d,.]+|no deal) \(ended by ([a-z ]+)\)$", out, re.M
    )
    assert outcome, out
    assert outcome.group(2) == row.ended_by.replace("_", " ")
    metrics = row.metrics
    assert metrics is not None
    if row.status == "deal":
        assert f"deal at ${metrics['price']:,.2f}" in out
        assert f"buyer {metrics['buyer_profit']:.2f}, seller {metrics['seller_profit']:.2f}" in out
    assert f"Turns:     {metrics['turns']} ({metrics['invalid_moves']} invalid)" in out
    assert f"Tokens:    {metrics['tokens']}" in out
    assert re.search(r"^Duration:  \d+\.\d s$", out, re.M)
    assert "Model:     lm_studio fake-model" in out
    assert "Traceback" not in out + err


async def test_a_custom_scenario_reaches_a_deal_inside_the_zone(upstream: FakeUpstream) -> None:
    upstream.default = Reply(tokens=["Sounds", " fair", "."])
    code, out, _ = await negotiate(*CUSTOM, "--category", "sports", "--max-turns", "8")
    assert code == 0, out
    row = await Negotiation.objects.aget()
    assert (row.item_title, row.item_category, row.scenario_index) == ("Road bike", "sports", None)
    assert row.status == "deal", out
    assert row.metrics is not None
    price = row.metrics["price"]
    assert 243.19 <= price <= 321.37
    assert f"Outcome:   deal at ${price:,.2f} (ended by accept)" in out
    assert "Road bike (custom, sports)" in out
    assert "buyer's budget $321.37, seller's cost $243.19 (mutual interest)" in out


async def test_messages_stream_token_by_token_in_order_each_side_on_its_lines(
    upstream: FakeUpstream,
) -> None:
    for turn in range(1, 11):
        # Apart in time: tokens that arrive together may come as one piece.
        upstream.replies.append(Reply(tokens=[f"T{turn}", " says", f" hi{turn}"], delay=0.03))
    stdout = Recorder()
    code, out, _ = await negotiate("--scenario", "0", "--max-turns", "4", stdout=stdout)
    assert code == 0, out
    moves = [m async for m in (await Negotiation.objects.aget()).moves.order_by("turn")]
    assert [m.side for m in moves] == ["seller", "buyer", "seller", "buyer"][: len(moves)]
    # Each move: its side's prefix, its tokens in order on that line, then what it did.
    spoken = [line for line in out.splitlines() if re.match(r"^(buyer|seller):", line)]
    assert spoken == [f"{m.side}:".ljust(8) + f"T{m.turn} says hi{m.turn}" for m in moves], out
    assert len(lines_of("seller", out)) == sum(m.side == "seller" for m in moves)
    positions = [out.index(f"T{m.turn} says hi{m.turn}") for m in moves]
    assert positions == sorted(positions)
    # Streamed: each token is written on its own, before the move it belongs to is summed up.
    first = stdout.writes.index("T1")
    assert stdout.writes[first + 1] == " says" and stdout.writes[first + 2] == " hi1"
    assert "-> offers" in "".join(stdout.writes[first + 3 :])


async def test_plain_output_when_not_a_terminal(upstream: FakeUpstream) -> None:
    upstream.default = Reply(tokens=["Hello", "!"])
    code, out, _ = await negotiate("--scenario", "1", "--max-turns", "4", stdout=Recorder())
    assert code == 0
    assert not ANSI.search(out)
    assert "seller: Hello!" in out


async def test_coloured_by_side_on_a_terminal(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    upstream.default = Reply(tokens=["Hello", "!"])
    code, out, _ = await negotiate("--scenario", "1", "--max-turns", "4", stdout=Recorder(True))
    assert code == 0
    assert ANSI.search(out)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "seller: Hello!" in plain and "buyer:  Hello!" in plain
    # The two sides' prefixes are styled differently.
    seller = re.search(r"(\x1b\[[0-9;]*m)seller:", out)
    buyer = re.search(r"(\x1b\[[0-9;]*m)buyer:", out)
    assert seller and buyer and seller.group(1) != buyer.group(1)

    # --no-color wins over the terminal.
    code, out, _ = await negotiate(
        "--scenario", "1", "--max-turns", "4", "--no-color", stdout=Recorder(True)
    )
    assert code == 0 and not ANSI.search(out)


async def test_a_refused_move_is_shown_with_its_reason(upstream: FakeUpstream) -> None:
    """An `llm` buyer whose answers are no move at all: asked again, then stored invalid."""
    upstream.default = Reply(tokens=["Not", " JSON"])
    code, out, _ = await negotiate(
        "--scenario", "2", "--buyer", "llm", "--max-turns", "2", stdout=Recorder()
    )
    assert code == 0, out
    assert "(refused: your answer was not a move" in out
    assert "-> refused again (the same): an offer without a price, stored as invalid" in out
    assert "buyer:  (nothing said)" in out
    assert "Turns:     2 (1 invalid)" in out


# --json ----------------------------------------------------------------------------------------


async def test_json_prints_the_stored_negotiation_and_nothing_else(upstream: FakeUpstream) -> None:
    upstream.default = Reply(tokens=["Deal", "?"])
    code, out, _ = await negotiate(*CUSTOM, "--max-turns", "6", "--json")
    assert code == 0
    report = json.loads(out)  # the whole stdout is one JSON object
    assert {"id", "status", "ended_by", "scenario", "moves", "metrics"} <= set(report)
    stored = await service.describe(report["id"])
    assert report == json.loads(json.dumps(stored, cls=DjangoJSONEncoder))
    assert report["status"] in ("deal", "no_deal")
    assert report["scenario"]["item"]["title"] == "Road bike"
    assert [m["turn"] for m in report["moves"]] == list(range(1, len(report["moves"]) + 1))
    assert report["metrics"]["turns"] == len(report["moves"])
    assert all(m["message"].startswith("Deal? I ") for m in report["moves"])


# Failures --------------------------------------------------------------------------------------


async def test_an_upstream_that_fails_exits_1_with_the_code(
    upstream: FakeUpstream, llm_config: Callable[..., Any]
) -> None:
    llm_config(max_retries=0, lm_studio={"base_url": upstream.base_url, "default_model": ""})
    upstream.default = Reply(status=500)
    code, out, err = await negotiate("--scenario", "0")
    assert code == 1, out + err
    row = await Negotiation.objects.aget()
    assert row.status == "failed" and row.ended_by == "error" and row.error_code
    assert f"Error:     {row.error_code}: " in out
    assert "Outcome:   failed (ended by error)" in out
    assert "Traceback" not in out + err

    code, out, _ = await negotiate("--scenario", "0", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["status"] == "failed"
    assert report["error"]["code"] == row.error_code


async def test_an_unreachable_provider_says_how_to_start_one(
    upstream: FakeUpstream, llm_config: Callable[..., Any]
) -> None:
    await upstream.stop()
    llm_config(max_retries=0, lm_studio={"base_url": upstream.base_url, "default_model": "m"})
    code, out, _ = await negotiate("--scenario", "0")
    assert code == 1
    assert "Error:     LLM_UNAVAILABLE: " in out
    assert "make run" in out and "llm_ping" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "0", "--buyer", "human"], "--buyer human: a person cannot play"),
        (["--scenario", "0", "--seller", "human"], "--seller human: a person cannot play"),
        (["--scenario", "0", "--buyer", "banana"], "--buyer: 'banana' is not a policy"),
        ([], "say what is negotiated: --scenario N"),
        (["--scenario", "0", "--item", "Bike"], "leave out --item"),
        (["--scenario", "0", "--category", "toys"], "leave out --category"),
        (["--item", "Bike", "--list-price", "10"], "a custom item needs --budget, --cost too"),
        (["--scenario", "-1"], "--scenario: Input should be greater than or equal to 0"),
        (["--scenario", "99999"], "--scenario: no scenario 99999"),
        (["--scenario", "0", "--max-turns", "1"], "--max-turns: Input should be greater than"),
        (["--scenario", "0", "--max-turns", "41"], "--max-turns: Input should be less than"),
        ([*CUSTOM[:3], "nan", *CUSTOM[4:]], "--list-price: Input should be a finite number"),
        ([*CUSTOM[:5], "0", *CUSTOM[6:]], "--budget: Input should be greater than or equal"),
        ([*CUSTOM[:1], "", *CUSTOM[2:]], "--item: String should have at least 1 character"),
        (["--scenario", "0", "--buyer-model", "a\nb"], "--buyer-model:"),
        (["--scenario", "abc"], "invalid int value: 'abc'"),
        (["--scenario", "0", "--opening", "both"], "invalid choice: 'both'"),
    ],
)
async def test_bad_options_are_refused_clearly_before_anything_runs(
    upstream: FakeUpstream, args: list[str], message: str
) -> None:
    with pytest.raises(CommandError) as raised:
        await negotiate(*args)
    assert message in str(raised.value)
    assert not await Negotiation.objects.aexists()
    assert not upstream.chat_requests


async def test_bad_llm_settings_end_with_the_check_id(llm_config: Callable[..., Any]) -> None:
    llm_config(provider="banana")
    with pytest.raises(CommandError) as raised:
        await negotiate("--scenario", "0")
    assert "llm.E001" in str(raised.value)
    assert not await Negotiation.objects.aexists()


# As a real process: exit statuses, no traceback, Ctrl-C --------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    from testkit.servers import project_env

    return project_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'cli.sqlite3'}", **extra)


def test_manage_py_bad_option_exits_2_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "negotiate", "--scenario", "0", "--buyer", "human"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "CommandError: --buyer human: a person cannot play" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def _migrated(env: dict[str, str], path: Path) -> None:
    """A migrated SQLite file for a subprocess: a copy of the test database's schema when the
    suite runs on SQLite (fast), `migrate` otherwise."""
    from django.db import connection

    from testkit import servers

    if connection.vendor != "sqlite":
        servers.manage(env, "migrate", "--noinput", "-v0")
        return
    connection.ensure_connection()
    with sqlite3.connect(path) as target:
        connection.connection.backup(target)


def test_ctrl_c_cancels_the_negotiation_and_exits_130(tmp_path: Path) -> None:
    from testkit import servers

    env = _env(tmp_path)
    _migrated(env, tmp_path / "cli.sqlite3")
    with servers.fake_upstream(tmp_path) as url:
        process = subprocess.Popen(
            # The fake upstream reads the reply from the model name: 400 slow tokens.
            [
                sys.executable,
                "manage.py",
                "negotiate",
                "--scenario",
                "0",
                "--seller-model",
                "bench:tokens=400,delay=0.05",
            ],
            cwd=ROOT,
            env=env | {"LM_STUDIO_BASE_URL": url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=servers.default_signals,  # Ctrl-C works even if ours is ignored
        )
        try:
            assert process.stdout is not None
            seen = ""
            deadline = time.monotonic() + 30
            while " t3" not in seen and time.monotonic() < deadline:
                seen += os.read(process.stdout.fileno(), 4096).decode()
            assert " t3" in seen, seen  # the seller's tokens arrive as they are written
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    out = seen + out
    assert process.returncode == 130, out + err
    assert time.monotonic() - started < 10
    assert "Outcome:   cancelled (ended by cancel)" in out
    assert "Interrupted" in err and "Traceback" not in out + err
    with sqlite3.connect(tmp_path / "cli.sqlite3") as db:
        rows = db.execute("SELECT status, ended_by FROM negotiation_negotiation").fetchall()
    assert rows == [("cancelled", "cancel")]
