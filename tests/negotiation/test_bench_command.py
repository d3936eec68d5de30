"""`manage.py negotiation_bench`: many library negotiations on the fake upstream, one table per
policy pair beside the paper's figures, a JSON report with exactly the contract's keys."""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from negotiation.models import Negotiation
from negotiation.scenarios import products, search
from testkit.fake_upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]

PAIR_KEYS = {
    "buyer",
    "seller",
    "scenarios",
    "deal_rate",
    "deal_rate_mutual",
    "deal_rate_conflicting",
    "buyer_profit_mean",
    "seller_profit_mean",
    "buyer_profit_median",
    "seller_profit_median",
    "invalid_move_rate",
    "deals_outside_zone",
    "turns_mean",
    "duration_ms_p50",
    "duration_ms_p95",
    "tokens_mean",
}
NEGOTIATION_KEYS = {"id", "scenario", "buyer", "seller", "status", "metrics"}
ANSI = re.compile(r"\x1b\[")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def bench(*args: str, stdout: io.StringIO | None = None) -> tuple[int, str, str]:
    """Run the command in a thread (it has its own event loop): (exit status, stdout, stderr)."""
    out, err = stdout or io.StringIO(), io.StringIO()

    def call() -> int:
        try:
            call_command("negotiation_bench", *args, stdout=out, stderr=err)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        return 0

    code = await asyncio.to_thread(call)
    return code, out.getvalue(), err.getvalue()


def seeded(count: int, seed: int = 0) -> list[int]:
    """The sample the command promises: `random.Random(seed)` over the library's indices."""
    return sorted(random.Random(seed).sample(range(len(products())), count))


async def test_six_scenarios_three_at_a_time_table_json_and_storage(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.default = Reply(tokens=["Fair", "."], delay=0.02)
    report_file = tmp_path / "bench.json"
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, upstream.active)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    code, out, err = await bench(
        "--scenarios", "6", "--concurrency", "3", "--max-turns", "6", "--json", str(report_file)
    )
    watcher.cancel()
    assert code == 0, out + err
    assert 2 <= peak <= 3  # three at a time (one request each at most), and they overlap

    # Every negotiation is stored like any other, on the seeded sample.
    rows = [row async for row in Negotiation.objects.all()]
    assert len(rows) == 6
    assert sorted(row.scenario_index for row in rows) == seeded(6)
    assert {(row.buyer_policy, row.seller_policy) for row in rows} == {("narrated", "narrated")}
    assert all(row.status in ("deal", "no_deal") for row in rows)

    # The table: the figures, and beside them the paper's, labelled as its.
    assert re.search(r"^negotiations +6$", out, re.M), out
    assert re.search(r"^deal rate +\d+\.\d % +26\.67 % +88\.88 %$", out, re.M), out
    for label in ("deal rate, mutual interest", "buyer profit, median", "invalid moves"):
        assert label in out
    assert "paper: LLM buyer" in out and "paper: OG-Narrator buyer" in out
    assert "Xia et al. 2024 (arXiv 2402.15813)" in out and "not measured here" in out
    assert "Model: lm_studio fake-model" in out

    # The JSON report: exactly the contract's keys.
    report = json.loads(report_file.read_text())
    assert {"pairs", "negotiations"} <= set(report)
    assert [set(pair) for pair in report["pairs"]] == [PAIR_KEYS]
    pair = report["pairs"][0]
    assert (pair["buyer"], pair["seller"], pair["scenarios"]) == ("narrated", "narrated", 6)
    deals = sum(row.status == "deal" for row in rows)
    assert pair["deal_rate"] == pytest.approx(deals / 6)
    assert f"{deals / 6 * 100:.1f} %" in out
    assert pair["deals_outside_zone"] == 0  # the narrated strategy never deals outside the zone
    for key in ("deal_rate", "deal_rate_mutual", "invalid_move_rate"):
        assert pair[key] is None or 0 <= pair[key] <= 1
    assert len(report["negotiations"]) == 6
    assert all(set(item) == NEGOTIATION_KEYS for item in report["negotiations"])
    stored = {str(row.pk): row for row in rows}
    for item in report["negotiations"]:
        row = stored[item["id"]]
        assert item["scenario"] == row.scenario_index
        assert (item["buyer"], item["seller"]) == ("narrated", "narrated")
        assert item["status"] == row.status
        assert item["metrics"] == row.metrics
    assert report["reference"]["deal_rate"]["llm_buyer"]["value"] == 0.2667
    assert report["settings"]["seed"] == 0 and report["settings"]["concurrency"] == 3
    assert report["settings"]["models"] == ["lm_studio fake-model"]


async def test_plain_progress_lines_when_not_a_terminal(upstream: FakeUpstream) -> None:
    upstream.default = Reply(tokens=["Ok", "."])
    code, out, _ = await bench("--scenarios", "3", "--seed", "7", "--max-turns", "4")
    assert code == 0, out
    assert not ANSI.search(out)
    line = r"^(\d+)/3 (deal|no_deal|failed) narrated/narrated scenario (\d+) "
    progress = re.findall(line, out, re.M)
    assert [int(done) for done, _, _ in progress] == [1, 2, 3]
    assert sorted(int(index) for _, _, index in progress) == seeded(3, seed=7)
    rows = {row.scenario_index: row.status async for row in Negotiation.objects.all()}
    for _, status, index in progress:
        assert rows[int(index)] == status


async def test_a_terminal_gets_a_progress_bar_and_a_rich_table(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    upstream.default = Reply(tokens=["Ok", "."])
    code, out, _ = await bench("--scenarios", "2", "--max-turns", "4", stdout=Terminal())
    assert code == 0
    assert ANSI.search(out)
    assert "Negotiation benchmark" in out and "│" in out  # a boxed rich table
    assert "narrated/narrated" in out and "88.88 %" in out
    assert not re.search(r"^\d+/2 ", out, re.M)  # a bar, not the plain lines


async def test_compare_runs_both_pairs_on_the_same_scenarios(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Plain text: the narrated sides word it; the llm buyer's answer is no move (invalid).
    upstream.default = Reply(tokens=["Fine", "."])
    report_file = tmp_path / "compare.json"
    code, out, err = await bench(
        "--scenarios",
        "3",
        "--seed",
        "3",
        "--concurrency",
        "3",
        "--max-turns",
        "4",
        "--buyer",
        "narrated",
        "--seller",
        "narrated",
        "--compare",
        "llm/narrated",
        "--json",
        str(report_file),
    )
    assert code == 0, out + err
    report = json.loads(report_file.read_text())
    assert [(p["buyer"], p["seller"]) for p in report["pairs"]] == [
        ("narrated", "narrated"),
        ("llm", "narrated"),
    ]
    assert all(set(pair) == PAIR_KEYS for pair in report["pairs"])
    by_pair: dict[tuple[str, str], list[int]] = {}
    for item in report["negotiations"]:
        by_pair.setdefault((item["buyer"], item["seller"]), []).append(item["scenario"])
    assert sorted(by_pair[("narrated", "narrated")]) == sorted(by_pair[("llm", "narrated")])
    assert sorted(by_pair[("llm", "narrated")]) == seeded(3, seed=3)
    assert await Negotiation.objects.acount() == 6
    assert await Negotiation.objects.filter(buyer_policy="llm").acount() == 3
    # Side by side in one table.
    assert re.search(r"^ +narrated/narrated +llm/narrated +paper: LLM buyer", out, re.M), out
    llm = report["pairs"][1]
    assert llm["invalid_move_rate"] > 0  # its buyer's plain-text answers are no move


async def test_a_category_runs_all_of_it(upstream: FakeUpstream) -> None:
    smallest = min({p.category for p in products()}, key=lambda c: (len(search(category=c)), c))
    expected = [p.index for p in search(category=smallest)]
    assert len(expected) <= 10, "the library's smallest category is expected to be small"
    upstream.default = Reply(tokens=["Ok"])
    code, out, _ = await bench("--category", smallest, "--concurrency", "4", "--max-turns", "2")
    assert code == 0, out
    indices = [row.scenario_index async for row in Negotiation.objects.all()]
    assert sorted(indices) == expected
    assert f"of category {smallest!r}" in out


async def test_failures_are_measured_not_fatal(
    upstream: FakeUpstream, llm_config: Callable[..., Any], tmp_path: Path
) -> None:
    llm_config(max_retries=0, lm_studio={"base_url": upstream.base_url, "default_model": ""})
    upstream.default = Reply(status=500)
    report_file = tmp_path / "failed.json"
    code, out, err = await bench("--scenarios", "2", "--json", str(report_file))
    assert code == 0, out + err
    rows = [row async for row in Negotiation.objects.all()]
    assert [row.status for row in rows] == ["failed", "failed"]
    codes = Counter(row.error_code for row in rows)
    ((error_code, count),) = codes.items()
    assert f"2 of 2 negotiations failed ({error_code} x{count})" in out
    assert re.search(rf"^\d/2 failed narrated/narrated scenario \d+ {error_code} ", out, re.M)
    report = json.loads(report_file.read_text())
    assert report["pairs"][0]["deal_rate"] == 0.0
    assert [item["status"] for item in report["negotiations"]] == ["failed", "failed"]
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--buyer", "human"], "--buyer human: a person cannot play"),
        (["--compare", "narrated/human"], "--compare's seller human: a person cannot play"),
        (["--compare", "llm"], "--compare: give BUYER/SELLER"),
        (["--compare", "narrated/narrated"], "that is the pair --buyer/--seller already names"),
        (["--scenarios", "0"], "--scenarios: at least 1"),
        (["--concurrency", "0"], "--concurrency: from 1 to 64"),
        (["--category", "no such thing"], "--category: no product of the library is in"),
        (["--max-turns", "1"], "--max-turns: Input should be greater than or equal to 2"),
        (["--json", "/nonexistent/dir/out.json"], "--json: cannot write in '/nonexistent/dir'"),
        (["--seed", "x"], "invalid int value: 'x'"),
    ],
)
async def test_bad_options_are_refused_before_anything_runs(
    upstream: FakeUpstream, args: list[str], message: str
) -> None:
    with pytest.raises(CommandError) as raised:
        await bench(*args)
    assert message in str(raised.value)
    assert not await Negotiation.objects.aexists()
    assert not upstream.chat_requests
