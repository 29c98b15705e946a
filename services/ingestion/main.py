"""Price ingestion: the one entrypoint.

    python -m services.ingestion replay --data PERP.csv [--funding F.csv] [--marks M.csv]
        --symbol BTC-USDT [--start ISO --end ISO] [--speed max|N] [--ticks ohlc|close]
    python -m services.ingestion synthetic --seed N --symbol X --ticks N
        [--scenario gaps|crash|chop|mixed]          (SYNTHETIC stress paths, tests only)
    python -m services.ingestion live --exchange binance --symbol BTC-USDT
    python -m services.ingestion serve              (what `make up` runs; source from
                                                      SMARTLEV_INGESTION_SOURCE)

Every command builds `IngestionSettings` (env, then flags) and runs the same source code
path as `serve`; the one-shot commands print a summary and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import redis
import redis.asyncio as aredis
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from services.ingestion.config import IngestionSettings
from services.ingestion.producer import BatchProducer
from services.ingestion.publisher import IngestionMetrics, Ingestor
from services.ingestion.runner import (
    Summary,
    ccxt_messages,
    longest_gap_s,
    run_finite,
    run_live,
    run_summary,
)
from services.ingestion.store import SeqStore, Standby, holder_token, topic_recovery
from services.ingestion.synthetic import SCENARIOS, SyntheticSpec, synthetic_stream
from services.ingestion.validation import MarketValue, Policy, Verdict
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.market_data import DataError, LoadReport, parse_time
from shared.adapters.tick_replay import backtest_stream
from shared.health import CheckResult, HealthRegistry, HealthServer, kafka_check, redis_check
from shared.heap import freeze_heap
from shared.interrupts import interrupt_on_hangup
from shared.logging import configure_logging, get_logger
from shared.serving import enter
from shared.topics import MARKET_TICKS
from shared.transient import is_transient

log = get_logger("ingestion")
console = Console(stderr=True)


def source_name(settings: IngestionSettings) -> str:
    if settings.source == "replay":
        return f"replay:{settings.replay_files()[0].name}"
    if settings.source == "synthetic":
        return f"synthetic:{settings.scenario}:seed={settings.seed}"
    return settings.exchange


def finite_events(settings: IngestionSettings) -> Iterable[MarketValue]:
    """The replay (exactly the backtester's stream) or synthetic events."""
    if settings.source == "synthetic":
        spec = SyntheticSpec(
            symbol=settings.symbol,
            seed=settings.seed,
            ticks=settings.synthetic_ticks,
            scenario=settings.scenario,
        )
        return synthetic_stream(spec)
    data, funding, marks = settings.replay_files()
    return backtest_stream(
        data,
        settings.symbol,
        funding=funding,
        marks=marks,
        start_ns=parse_time(settings.start),
        end_ns=parse_time(settings.end),
        mode=settings.ticks,
        on_report=log_load_report,
    )


def log_load_report(report: LoadReport) -> None:
    """What a replay's files held that it leaves out or cannot fill (the backtest prints
    the same): a warning for gaps, which the replay publishes through (the listing's
    placeholder rows the real files begin with are skipped as a matter of course)."""
    (log.warning if report.gaps else log.info)(
        "load_report",
        path=report.path,
        summary=report.summary(),
        placeholders_skipped=report.placeholder_rows_skipped,
        gaps=report.gaps,
        missing=report.missing_bars,
    )


def events_to_publish(settings: IngestionSettings) -> list[MarketValue]:
    """`finite_events` loaded, for an entrypoint: they live to the end, so the heap is
    frozen after them (shared/heap.py)."""
    events = list(finite_events(settings))
    freeze_heap()
    return events


def build_ingestor(
    settings: IngestionSettings, metrics: IngestionMetrics, token: str | None = None
) -> tuple[Ingestor, Any, Any]:
    """(ingestor, producer, state store): topics ensured, nothing published yet. `token`:
    the run's lease holder (`holder_token()`), the same for each of its attempts."""
    topic = MARKET_TICKS.in_namespace(settings.namespace)
    ensure_topics(settings.kafka_bootstrap, [topic, topic.dlq()], verbose=False)
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = SeqStore(
        client,
        settings.namespace,
        topic_recovery(settings.kafka_bootstrap, topic.name),
        lease_ttl_s=settings.lease_ttl_s,
        token=token,
    )
    producer = BatchProducer(settings.kafka_bootstrap, client_id="smartlev-ingestion")
    ingestor = Ingestor(
        producer=producer,
        store=store,
        topic=topic.name,
        dlq_topic=topic.dlq_name,
        source=source_name(settings),
        policy=Policy(max_jump=settings.max_jump),
        metrics=metrics,
        log=log,
    )
    return ingestor, producer, store


class Attempts:
    """The attempts of one source: each gets a fresh ingestor (the previous one's producer
    and state store closed); after a transient failure (`shared.transient`) it says why
    (`on_retry`; None once running again) and sets the pause, doubling up to the max; on
    standby (another ingestion holds the symbol) it waits for that one's lease to run
    out; any other failure is raised."""

    def __init__(
        self,
        settings: IngestionSettings,
        build: Callable[[], tuple[Ingestor, Any, Any]],
        on_retry: Callable[[str | None], None],
    ) -> None:
        self._build = build
        self.on_retry = on_retry
        self.pause = settings.retry_backoff_s
        self.max_pause = settings.retry_backoff_max_s
        self.retries = 0
        self._clients: tuple[Any, Any] | None = None

    def build(self) -> Ingestor:
        self.close()
        ingestor, producer, store = self._build()
        self._clients = (producer, store)
        self.on_retry(None)
        return ingestor

    def failed(self, exc: Exception) -> float:
        """The pause before the next attempt (after closing this one's clients)."""
        self.close()
        if isinstance(exc, Standby):
            log.info("standby", reason=str(exc), pause_s=round(exc.retry_after_s, 3))
            self.on_retry(f"standby: {exc}")
            return exc.retry_after_s
        if not is_transient(exc):
            raise exc
        self.retries += 1
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("source_retry", error=reason, pause_s=self.pause, retries=self.retries)
        self.on_retry(f"retrying after {reason}")
        pause, self.pause = self.pause, min(self.pause * 2, self.max_pause)
        return pause

    def close(self) -> None:
        if self._clients is None:
            return
        (producer, store), self._clients = self._clients, None
        with contextlib.suppress(Exception):  # a broker that is down: drop it
            producer.close(timeout=5)
        store.close()


def run_with_retries(
    settings: IngestionSettings,
    build: Callable[[], tuple[Ingestor, Any, Any]],
    events: Sequence[MarketValue],
    *,
    stop: threading.Event,
    progress: Callable[[int], None] | None = None,
    on_retry: Callable[[str | None], None] = lambda _: None,
) -> Summary:
    """Publish a finite source to its end, whatever the broker and Redis do meanwhile.

    A transient failure drops the producer and the Redis client and, after the pause,
    starts over exactly as a restarted process would: state loaded from Redis and the
    topic's tail, events already published skipped (`Attempts`)."""
    attempts = Attempts(settings, build, on_retry)
    verdicts: dict[int, Verdict] = {}  # every attempt's, by event: the run's summary
    began = time.perf_counter()
    try:
        while True:
            try:
                summary = run_finite(
                    attempts.build(),
                    settings.symbol,
                    events,
                    speed=settings.speed_factor,
                    batch_size=settings.batch_size,
                    stop=stop,
                    progress=progress,
                    verdicts=verdicts,
                )
                seconds = time.perf_counter() - began
                return run_summary(verdicts, summary.skipped, attempts.retries, seconds)
            except Exception as exc:  # `failed` raises what is not transient
                pause = attempts.failed(exc)
            if stop.wait(pause):
                raise InterruptedError("stopped while waiting to retry")
    finally:
        attempts.close()


def print_summary(summary: Summary) -> None:
    print(
        f"published {summary.published}, rejected {summary.rejected}, "
        f"dead-lettered {summary.dead_lettered}, flagged jumps {summary.flagged}, "
        f"skipped (already published) {summary.skipped}, retries {summary.retries}, "
        f"{summary.seconds:.2f}s, {summary.rate:,.0f} msg/s"
    )


def run_once(settings: IngestionSettings) -> int:
    """replay / synthetic from the command line: progress bar, then the summary."""
    configure_logging(
        "ingestion", "WARNING" if settings.log_level == "INFO" else settings.log_level
    )
    try:
        events = events_to_publish(settings)
    except DataError as exc:  # a file that is not the data it should be
        print(f"ingestion: {exc}", file=sys.stderr)
        return 2
    with Progress(
        TextColumn(f"{settings.source} {settings.symbol}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("events", total=len(events), status="")
        metrics, token = IngestionMetrics(), holder_token()
        summary = run_with_retries(
            settings,
            lambda: build_ingestor(settings, metrics, token),
            events,
            stop=threading.Event(),
            progress=lambda n: progress.update(task, completed=n),
            on_retry=lambda why: progress.update(task, status=why or ""),
        )
    print_summary(summary)
    if summary.skipped and not (summary.published or summary.dead_lettered):
        print(
            f"ingestion: nothing new: all {summary.skipped:,} events are at or before the "
            f"last one already on market.ticks for {settings.symbol} (it only moves "
            "forward; a fresh namespace starts over)",
            file=sys.stderr,
        )
    return 0


async def serve(settings: IngestionSettings) -> int:
    """The long-running service: health/metrics, then the configured source."""
    enter("ingestion", settings)
    metrics = IngestionMetrics()
    health = HealthRegistry()
    health.register("kafka", kafka_check(settings.kafka_bootstrap))
    check_client = aredis.Redis.from_url(settings.redis_url)
    health.register("redis", redis_check(check_client))
    server = HealthServer(
        health, port=settings.metrics_port, host=settings.metrics_host, service="ingestion"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("started", source=settings.source, symbol=settings.symbol, port=server.port)
    try:
        if settings.source == "idle":
            await stop.wait()  # healthy, publishing nothing
            return 0
        return await _serve_source(settings, metrics, health, stop)
    finally:
        await server.stop()
        await check_client.aclose()
        log.info("stopped")


async def _serve_source(
    settings: IngestionSettings,
    metrics: IngestionMetrics,
    health: HealthRegistry,
    stop: asyncio.Event,
) -> int:
    wall_clock_feed = settings.source == "live" or settings.speed_factor is not None
    finished = threading.Event()
    failure: list[str] = []
    retrying: list[str | None] = [None]  # why the source waits to retry, if it does
    current: list[Ingestor] = []  # the ingestor of the running attempt
    events: list[MarketValue] = []
    if settings.source != "live":
        try:
            events = events_to_publish(settings)
        except DataError as exc:  # a window the files do not cover, a broken file
            failure.append(f"{type(exc).__name__}: {exc}")
            log.error("source_failed", source=settings.source, error=str(exc))
    stale_limit = settings.stale_after_s
    if events and settings.speed_factor is not None:
        # a paced replay waits up to its longest gap / speed between events, not late
        stale_limit += longest_gap_s(events) / settings.speed_factor

    token = holder_token()

    def build() -> tuple[Ingestor, Any, Any]:
        built = build_ingestor(settings, metrics, token)
        current[:] = [built[0]]
        return built

    live = Attempts(settings, build, lambda why: retrying.__setitem__(0, why))

    def feed_check() -> CheckResult:
        if failure:
            return f"source failed: {failure[0]}"
        if retrying[0] is not None:
            return retrying[0]
        if finished.is_set() or not wall_clock_feed or not current:
            return True
        age = current[0].staleness()
        if age <= stale_limit:
            return True
        return f"stale: no event for {age:.1f}s (max {stale_limit:.0f}s)"

    health.register("feed", feed_check)
    if failure:  # up, unhealthy, saying why (a restart would fail the same way)
        await stop.wait()
        return 1
    halt = threading.Event()
    work: asyncio.Future[Any]
    if settings.source == "live":

        async def failed(exc: Exception) -> None:
            await asyncio.sleep(await asyncio.to_thread(live.failed, exc))

        freeze_heap()  # shared/heap.py
        connect = functools.partial(ccxt_messages, settings.symbol)
        work = asyncio.ensure_future(run_live(live.build, settings.symbol, connect, failed))
    else:
        job = functools.partial(
            run_with_retries,
            settings,
            build,
            events,
            stop=halt,
            on_retry=lambda why: retrying.__setitem__(0, why),
        )
        work = asyncio.ensure_future(asyncio.to_thread(job))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            try:
                result = work.result()
            except Exception as exc:
                failure.append(f"{type(exc).__name__}: {exc}")
                log.exception("source_failed", source=settings.source)
                await stop.wait()  # stay up, unhealthy, so the failure is visible
                return 1
            finished.set()
            if isinstance(result, Summary):
                log.info("source_finished", rate=round(result.rate), **asdict(result))
            await stop.wait()
        return 0
    finally:
        halt.set()
        work.cancel()
        stopping.cancel()
        with contextlib.suppress(BaseException):
            await work
        await asyncio.to_thread(live.close)


# A flag not given leaves its setting to the environment, then the settings' default
# (the parser's own defaults replaced SMARTLEV_INGESTION_SYMBOL and the rest unseen).
UNSET = argparse.SUPPRESS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.ingestion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help="replay real history as ticks")
    replay.add_argument("--data", required=True, help="perpetual 1h OHLCV CSV")
    replay.add_argument("--funding", help="funding-rate CSV (8h)")
    replay.add_argument("--marks", help="mark-price 1h CSV")
    replay.add_argument("--symbol", default=UNSET)
    replay.add_argument("--start", help="first bar, ISO-8601 UTC")
    replay.add_argument("--end", help="end (exclusive), ISO-8601 UTC")
    replay.add_argument("--speed", default=UNSET, help="max, or N x real time")
    replay.add_argument("--ticks", choices=("ohlc", "close"), default=UNSET)
    synthetic = commands.add_parser("synthetic", help="SYNTHETIC stress paths (tests only)")
    synthetic.add_argument("--seed", type=int, required=True)
    synthetic.add_argument("--symbol", default=UNSET)
    synthetic.add_argument("--ticks", type=int, default=UNSET, dest="synthetic_ticks")
    synthetic.add_argument("--scenario", choices=SCENARIOS, default=UNSET)
    synthetic.add_argument("--speed", default=UNSET, help="max, or N x event time")
    live = commands.add_parser("live", help="live exchange feed (ccxt.pro websocket)")
    live.add_argument("--exchange", choices=("binance",), default=UNSET)
    live.add_argument("--symbol", default=UNSET)
    commands.add_parser("serve", help="the long-running service (source from settings)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    overrides = {k: v for k, v in args.items() if v is not None}
    if command != "serve":
        overrides["source"] = command
    try:
        settings = IngestionSettings(**overrides)
    except (ValidationError, SettingsError) as exc:
        print(f"ingestion: bad settings:\n{exc}", file=sys.stderr)
        return 2
    if command in ("replay", "synthetic"):
        interrupt_on_hangup()  # SIGTERM too runs the cleanup: the lease is handed back
        try:
            return run_once(settings)
        except KeyboardInterrupt as stop:
            print(
                f"ingestion: stopped ({stop or 'SIGINT'}); what was published stays on "
                "market.ticks, and running it again goes on after it",
                file=sys.stderr,
            )
            return 130
    return asyncio.run(serve(settings))
