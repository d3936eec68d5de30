"""`manage.py negotiation_bench`: many library negotiations, one table of metrics per policy pair.

    manage.py negotiation_bench --scenarios 50 --concurrency 4
    manage.py negotiation_bench --buyer narrated --seller narrated --compare llm/narrated
    manage.py negotiation_bench --category electronics --json bench/results/negotiation.json

The scenarios are a seeded random sample of the library (`random.Random(seed)`, seed 0 by
default), or all of a category; `--compare BUYER/SELLER` plays a second pair on the same ones.
They run C at a time in this process, each stored like any other negotiation (API, admin). The
table (`negotiation.bench.pair_row`) stands beside the deal rates the paper published, labelled
as its figures. A failed negotiation is part of the measurement (no deal): the command still
exits 0, and says how many failed with which codes. Exit 2 for bad options, 130 on Ctrl-C (every
negotiation under way is cancelled).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from negotiation import service
from negotiation.bench import PAIR_FIELDS, REFERENCE, REFERENCE_CITATION, Result, pair_row
from negotiation.bench import reference_json as reference
from negotiation.runner import Run
from negotiation.scenarios import categories, products, search
from negotiation.schemas import NegotiationIn

from .negotiate import (
    INTERRUPTED,
    check_settings_or_fail,
    close_connections,
    make_console,
    models_used,
    money,
    quiet_logs,
    side_policy,
    usage_error,
    validate,
)

__all__ = ["Command", "Finished", "Job", "Reporter"]

DEFAULT_SCENARIOS = 20
DEFAULT_CONCURRENCY = 2
MAX_CONCURRENCY = 64

# The table's rows: (field, label, how it is shown).
Formatter = Callable[[Any], str]


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _fixed(digits: int) -> Formatter:
    return lambda value: "-" if value is None else f"{value:.{digits}f}"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value / 1000:.2f} s"


ROWS: tuple[tuple[str, str, Formatter], ...] = (
    ("scenarios", "negotiations", str),
    ("deal_rate", "deal rate", _pct),
    ("deal_rate_mutual", "deal rate, mutual interest", _pct),
    ("deal_rate_conflicting", "deal rate, conflicting interest", _pct),
    ("buyer_profit_mean", "buyer profit, mean", _fixed(3)),
    ("seller_profit_mean", "seller profit, mean", _fixed(3)),
    ("buyer_profit_median", "buyer profit, median", _fixed(3)),
    ("seller_profit_median", "seller profit, median", _fixed(3)),
    ("invalid_move_rate", "invalid moves", _pct),
    ("deals_outside_zone", "deals outside [cost, budget]", str),
    ("turns_mean", "turns, mean", _fixed(1)),
    ("duration_ms_p50", "duration, p50", _seconds),
    ("duration_ms_p95", "duration, p95", _seconds),
    ("tokens_mean", "tokens, mean", _fixed(0)),
)
assert {field for field, _, _ in ROWS} == set(PAIR_FIELDS) - {"buyer", "seller"}


@dataclass(frozen=True, slots=True)
class Job:
    buyer: str
    seller: str
    scenario: int
    spec: NegotiationIn


@dataclass(frozen=True, slots=True)
class Finished:
    job: Job
    id: str
    status: str
    ended_by: str
    metrics: dict[str, Any]
    error_code: str
    budget: float
    cost: float

    def as_json(self) -> dict[str, Any]:
        """The contract's item of `negotiations` in the JSON report."""
        return {
            "id": self.id,
            "scenario": self.job.scenario,
            "buyer": self.job.buyer,
            "seller": self.job.seller,
            "status": self.status,
            "metrics": self.metrics,
        }


class Reporter:
    """Says how far the benchmark is: a rich progress bar per pair on a terminal, one plain line
    per finished negotiation otherwise (`12/50 deal narrated/narrated scenario 3 ...`)."""

    def __init__(self, console: Console, pairs: Sequence[tuple[str, str]], per_pair: int) -> None:
        self.console = console
        self.total = per_pair * len(pairs)
        self.done = 0
        self.live = console.is_terminal and not console.is_dumb_terminal
        self.progress: Progress | None = None
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.counts: dict[tuple[str, str], Counter[str]] = {pair: Counter() for pair in pairs}
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[deals]} deals, {task.fields[failed]} failed"),
                TimeElapsedColumn(),
                console=console,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            for buyer, seller in pairs:
                self.tasks[(buyer, seller)] = self.progress.add_task(
                    f"{buyer}/{seller}", total=per_pair, deals=0, failed=0
                )

    def __enter__(self) -> Reporter:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def finished(self, result: Finished) -> None:
        self.done += 1
        job = result.job
        pair = (job.buyer, job.seller)
        self.counts[pair][result.status] += 1
        if self.progress is not None:
            counts = self.counts[pair]
            self.progress.update(
                self.tasks[pair], advance=1, deals=counts["deal"], failed=counts["failed"]
            )
            return
        metrics = result.metrics
        if result.status == "deal":
            detail = f"at {money(metrics.get('price'))} in {metrics.get('turns')} turns"
        elif result.status == "failed":
            detail = f"{result.error_code or 'error'} after {metrics.get('turns', 0)} turns"
        else:
            ended = result.ended_by.replace("_", " ") or "-"
            detail = f"by {ended} after {metrics.get('turns', 0)} turns"
        self.console.print(
            f"{self.done}/{self.total} {result.status} {job.buyer}/{job.seller} "
            f"scenario {job.scenario} {detail}"
        )


class Command(BaseCommand):
    help = (
        "Run many library negotiations (a seeded sample, or a category) C at a time and print "
        "one table of metrics per policy pair, beside the deal rates the research published."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--scenarios",
            type=int,
            metavar="N",
            help=f"How many library scenarios (default {DEFAULT_SCENARIOS}; with --category: all "
            "of it).",
        )
        parser.add_argument("--seed", type=int, default=0, metavar="S", help="Default 0.")
        parser.add_argument("--category", metavar="C", help="Only this category's products.")
        parser.add_argument(
            "--concurrency",
            type=int,
            default=DEFAULT_CONCURRENCY,
            metavar="C",
            help=f"Negotiations at a time (default {DEFAULT_CONCURRENCY}).",
        )
        parser.add_argument("--buyer", default="narrated", metavar="POLICY", help="narrated/llm")
        parser.add_argument("--seller", default="narrated", metavar="POLICY", help="narrated/llm")
        parser.add_argument("--max-turns", type=int, default=10, metavar="N", help="Default 10.")
        parser.add_argument(
            "--compare",
            metavar="BUYER/SELLER",
            help="A second policy pair on the same scenarios, e.g. llm/narrated.",
        )
        parser.add_argument(
            "--json", dest="json_file", metavar="FILE", help="Also write the results there."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        pairs = [
            (side_policy("--buyer", options["buyer"]), side_policy("--seller", options["seller"]))
        ]
        if options["compare"] is not None:
            pairs.append(self.compared(options["compare"], pairs[0]))
        concurrency = options["concurrency"]
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise usage_error(f"--concurrency: from 1 to {MAX_CONCURRENCY}, not {concurrency}")
        json_file = Path(options["json_file"]) if options["json_file"] else None
        if json_file is not None:
            folder = json_file.parent
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise usage_error(f"--json: cannot write in {str(folder)!r}")
        console = make_console(
            self.stdout,
            no_color=options.get("no_color", False),
            force_color=options.get("force_color", False),
        )
        indices, note = self.sample(options["scenarios"], options["seed"], options["category"])
        # Interleaved (each scenario by every pair in turn): a server that slows down as the run
        # goes on weighs on the pairs alike.
        jobs = [
            Job(buyer, seller, index, self.spec(index, buyer, seller, options["max_turns"]))
            for index in indices
            for buyer, seller in pairs
        ]
        check_settings_or_fail()

        where = f"category {options['category']!r}" if options["category"] else "the library"
        console.print(
            f"{len(indices)} scenarios of {where} (seed {options['seed']}){note}, "
            f"{' and '.join(f'{b}/{s}' for b, s in pairs)}, {concurrency} at a time, at most "
            f"{options['max_turns']} turns"
        )
        with quiet_logs(options["verbosity"]), Reporter(console, pairs, len(indices)) as reporter:
            try:
                finished, interrupted, models = asyncio.run(
                    self.run_all(jobs, concurrency, reporter.finished)
                )
            except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
                interrupted, finished = True, []
        if interrupted:
            self.stderr.write(
                f"Interrupted: {len(finished)} of {len(jobs)} negotiations had finished; the "
                "ones under way are cancelled. No table, no JSON."
            )
            raise SystemExit(INTERRUPTED)

        rows = [
            pair_row(
                buyer,
                seller,
                (
                    Result(f.metrics, f.budget, f.cost)
                    for f in finished
                    if (f.job.buyer, f.job.seller) == (buyer, seller)
                ),
            )
            for buyer, seller in pairs
        ]
        console.print("")
        self.print_table(console, rows)
        failed = Counter(f.error_code or "error" for f in finished if f.status == "failed")
        if failed:
            codes = ", ".join(f"{code} x{count}" for code, count in failed.most_common())
            console.print(
                f"{sum(failed.values())} of {len(finished)} negotiations failed ({codes}); "
                "they count as no deal.",
                style="yellow",
            )
        if models:
            console.print(f"Model: {', '.join(models)}")
        if json_file is not None:
            report = {
                "pairs": rows,
                "negotiations": [f.as_json() for f in finished],
                "reference": reference(),
                "settings": {
                    "scenarios": len(indices),
                    "seed": options["seed"],
                    "category": options["category"],
                    "concurrency": concurrency,
                    "max_turns": options["max_turns"],
                    "provider": settings.LLM["PROVIDER"],
                    "models": models,
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                },
            }
            try:
                json_file.write_text(json.dumps(report, indent=2) + "\n")
            except OSError as exc:
                raise usage_error(f"--json: cannot write {str(json_file)!r}: {exc}") from None
            console.print(f"Results written to {json_file}")

    # Options ----------------------------------------------------------------------------------

    def compared(self, value: str, first: tuple[str, str]) -> tuple[str, str]:
        buyer, slash, seller = value.partition("/")
        if not slash or not buyer or not seller:
            raise usage_error(f"--compare: give BUYER/SELLER, e.g. llm/narrated, not {value!r}")
        pair = (side_policy("--compare's buyer", buyer), side_policy("--compare's seller", seller))
        if pair == first:
            raise usage_error(
                f"--compare {value}: that is the pair --buyer/--seller already names; compare "
                "another one"
            )
        return pair

    def sample(self, count: int | None, seed: int, category: str | None) -> tuple[list[int], str]:
        """The library indices to run (sorted), and a note when fewer than asked exist."""
        if category is not None:
            pool = [product.index for product in search(category=category)]
            if not pool:
                known = categories()
                shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
                raise usage_error(
                    f"--category: no product of the library is in {category!r}; its "
                    f"{len(known)} categories are: {shown}"
                )
        else:
            pool = [product.index for product in products()]
        if count is None:
            count = len(pool) if category is not None else DEFAULT_SCENARIOS
        if count < 1:
            raise usage_error(f"--scenarios: at least 1, not {count}")
        note = ""
        if count >= len(pool):
            if count > len(pool):
                note = f" (all {len(pool)}: {count} asked)"
            return pool, note
        return sorted(random.Random(seed).sample(pool, count)), note

    def spec(self, index: int, buyer: str, seller: str, max_turns: int) -> NegotiationIn:
        return validate(
            {
                "scenario": index,
                "buyer": {"policy": buyer},
                "seller": {"policy": seller},
                "max_turns": max_turns,
            }
        )

    # Running ----------------------------------------------------------------------------------

    async def run_all(
        self, jobs: Sequence[Job], concurrency: int, on_finished: Callable[[Finished], None]
    ) -> tuple[list[Finished], bool, list[str]]:
        """Every job, `concurrency` at a time; on Ctrl-C every run under way is cancelled."""
        gate = asyncio.Semaphore(concurrency)
        starts: list[asyncio.Future[Run]] = []
        finished: list[Finished] = []

        async def play(job: Job) -> None:
            async with gate:
                # Shielded: a Ctrl-C during the start still leaves a run to cancel, never a row
                # left `running` with nothing running it.
                start = asyncio.ensure_future(service.start(job.spec))
                starts.append(start)
                run = await asyncio.shield(start)
                await run.done.wait()
                finished.append(self.finished(job, run))
                on_finished(finished[-1])

        try:
            tasks = [asyncio.ensure_future(play(job)) for job in jobs]
            try:
                await asyncio.gather(*tasks)
                interrupted = False
            except asyncio.CancelledError:
                interrupted = True
                for task in tasks:
                    task.cancel()
                runs = await asyncio.gather(*starts, return_exceptions=True)
                await asyncio.gather(
                    *(run.stop() for run in runs if isinstance(run, Run) and not run.done.is_set())
                )
            models = await models_used(f.id for f in finished)
            return finished, interrupted, models
        finally:
            await close_connections()

    def finished(self, job: Job, run: Run) -> Finished:
        scenario = run.record.scenario
        return Finished(
            job=job,
            id=run.id,
            status=run.status,
            ended_by=run.ended_by,
            metrics=dict(run.metrics or {}),
            error_code=run.error.code if run.error is not None else "",
            budget=scenario.buyer_budget,
            cost=scenario.seller_cost,
        )

    # The table --------------------------------------------------------------------------------

    def print_table(self, console: Console, rows: Sequence[dict[str, Any]]) -> None:
        """The pairs side by side, one row per metric, then the paper's deal rates."""
        headers = ["", *(f"{row['buyer']}/{row['seller']}" for row in rows)]
        headers += [f"paper: {ref.label}" for ref in REFERENCE]
        body = []
        for field, label, show in ROWS:
            cells = [label, *(show(row[field]) for row in rows)]
            cells += [  # as published: two decimals
                f"{ref.deal_rate * 100:.2f} %" if field == "deal_rate" else "" for ref in REFERENCE
            ]
            body.append(cells)
        caption = (
            f"paper: deal rates published by {REFERENCE_CITATION} for its own models and data, "
            "not measured here. Profits: normalised by |budget - cost|, over deals only."
        )
        if console.is_terminal:
            table = Table(title="Negotiation benchmark", caption=caption, caption_justify="left")
            for index, header in enumerate(headers):
                paper = index > len(rows)
                table.add_column(
                    header,
                    justify="left" if index == 0 else "right",
                    style="dim" if paper else None,
                    header_style="dim" if paper else "bold",
                )
            for cells in body:
                table.add_row(*cells)
            console.print(table)
            return
        widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
        for line in [headers, *body]:
            console.print(
                "  ".join(
                    cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                    for i, cell in enumerate(line)
                ).rstrip()
            )
        console.print(caption)
