"""Drive an `Ingestor` from a source: finite streams (replay, synthetic) and the live feed.

The loops only move events: validation is `validation.admit`, parsing `binance`, pacing
`paced` (pure), publishing and recording `publisher.Ingestor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from services.ingestion.binance import BinanceFeed, FeedError, ccxt_symbol
from services.ingestion.publisher import Ingestor
from services.ingestion.store import SymbolTaken
from services.ingestion.validation import (
    Accepted,
    MarketValue,
    Reason,
    Rejected,
    Verdict,
    check,
)
from shared.core.market import OrderKey, order_key

# A paced replay sends the events due within this long together, as a live feed's
# updates come in bursts (many exchange streams push every 100 ms): every stage then
# takes ~20 ticks a batch at 1,000 ticks/s instead of ~10, and its costs are mostly per
# batch. Against 5 ms, at 1,000 ticks/s: tick -> NAV p50 29-47 vs 42-83 ms, p99 68-109
# vs 88-197 ms, regime's CPU 0.35-0.40 vs 0.46-0.49 ms a tick (alternating runs).
PACE_GRANULARITY_S = 0.02


@dataclass(frozen=True, slots=True)
class Summary:
    published: int
    rejected: int
    dead_lettered: int
    flagged: int
    skipped: int  # already published by an earlier run (resumed after them)
    seconds: float
    retries: int = 0  # rebuilt and resumed after a broker or Redis failure

    @property
    def rate(self) -> float:
        """Published + dead-lettered messages per second."""
        return (self.published + self.dead_lettered) / self.seconds if self.seconds else 0.0


def paced(
    events: Iterable[MarketValue], speed: float | None
) -> Iterator[tuple[float, MarketValue]]:
    """(when the event is due, in seconds after the first one, event): event time since
    the first event divided by `speed` (None: all due at once, as fast as possible). Due
    times are absolute, so time spent publishing is not added to every gap (relative
    waits made "1,000 ticks/s" ~550/s); an event out of order is due with its predecessor."""
    first: int | None = None
    due = 0.0
    for event in events:
        ts = event.ts_ns if check(event) is None else None
        if ts is not None and speed is not None:
            if first is None:
                first = ts
            due = max(due, (ts - first) / 1e9 / speed)
        yield due, event


def longest_gap_s(events: Iterable[MarketValue]) -> float:
    """The longest stretch of event time between consecutive valid events (seconds): a
    replay paced at `speed` waits up to this / speed for its next event, and is not
    stale meanwhile."""
    times = [event.ts_ns for event in events if check(event) is None]
    return max((b - a for a, b in itertools.pairwise(times)), default=0) / 1e9


LONGEST_WAIT_S = 3600.0


def _stopped_before(due_s: float, started: float, stop: threading.Event) -> bool:
    """Wait until an event is due (`started`: the replay's monotonic start), an hour at
    most at a time: a speed of 1e-8 made one wait of years, past what the platform's
    clock takes (OverflowError); True if `stop` was set meanwhile."""
    while (ahead_s := wait_before(due_s, time.monotonic() - started)) > 0:
        if stop.wait(min(ahead_s, LONGEST_WAIT_S)):
            return True
    return False


def wait_before(due_s: float, elapsed_s: float) -> float:
    """Seconds to wait before publishing an event due `due_s` into the replay, at
    `elapsed_s`: none if it is due within `PACE_GRANULARITY_S`. So events due close
    together go out together, one wake-up and one produce request for all of them
    instead of one each (a wake-up alone costs ~40 us of CPU here); none goes out more
    than that early (latency is timed from each tick's own publish)."""
    ahead_s = due_s - elapsed_s
    return ahead_s if ahead_s > PACE_GRANULARITY_S else 0.0


class Resume:
    """Drop the leading events at or before `after` (what an earlier run published), so
    a restarted replay continues where it stopped instead of dead-lettering its past.
    An invalid event (no order key) among them belongs to that past if a valid one at or
    before `after` follows it; one before the first new event goes out again (its dead
    letter at least once), as the earlier run may have stopped before it."""

    def __init__(self, events: Iterable[MarketValue], after: OrderKey | None) -> None:
        self.events = events
        self.after = after
        self.skipped = 0

    def __iter__(self) -> Iterator[MarketValue]:
        after = self.after
        if after is None:
            yield from self.events
            return
        undecided: list[MarketValue] = []  # invalid events since the last skipped one
        events = iter(self.events)
        for event in events:
            if check(event) is not None:
                undecided.append(event)
                continue
            if order_key(event) <= after:
                self.skipped += 1 + len(undecided)
                undecided.clear()
                continue
            yield from undecided
            yield event
            break
        else:
            yield from undecided
            return
        yield from events


def run_finite(
    ingestor: Ingestor,
    symbol: str,
    events: Iterable[MarketValue],
    *,
    speed: float | None,
    batch_size: int,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
    commit_interval_s: float = 0.1,
    verdicts: dict[int, Verdict] | None = None,
) -> Summary:
    """Publish a finite stream for `symbol`, resuming after what is already published.
    `verdicts`: each submitted event's, by its index in `events` (`run_summary`)."""
    stop = stop or threading.Event()
    began = time.perf_counter()
    source = Resume(events, ingestor.state(symbol).last_key)
    since_commit, committed_at = 0, time.monotonic()
    started = time.monotonic()
    for count, (due_s, event) in enumerate(paced(source, speed), start=1):
        ahead_s = wait_before(due_s, time.monotonic() - started)
        if ahead_s > 0:
            # Acks and the Redis record once per `commit_interval_s` (or before a longer
            # pause), not before every paced event: that capped a paced replay at ~220
            # events/s. Events still leave at once: the producer sends in the background.
            if ahead_s >= commit_interval_s or time.monotonic() - committed_at >= commit_interval_s:
                ingestor.commit()
                since_commit, committed_at = 0, time.monotonic()
            if _stopped_before(due_s, started, stop):
                break
        if stop.is_set():
            break
        verdict = ingestor.submit(event)
        if verdicts is not None:
            verdicts[source.skipped + count - 1] = verdict
        since_commit += 1
        if since_commit >= batch_size:
            ingestor.commit()
            since_commit, committed_at = 0, time.monotonic()
        if progress is not None:
            progress(count + source.skipped)
    ingestor.commit()
    stats = ingestor.stats
    return Summary(
        stats.published,
        stats.rejected,
        stats.dead_lettered,
        stats.flagged,
        source.skipped,
        time.perf_counter() - began,
    )


def run_summary(
    verdicts: dict[int, Verdict], skipped: int, retries: int, seconds: float
) -> Summary:
    """A finite run's summary over all its attempts, from each event's last verdict (the
    attempt that finished counted only its own events, and took those an earlier attempt
    published for "already published"). The run began at the first event it submitted;
    whatever came before was there before it (`skipped`, if it submitted none)."""
    accepted = [v for v in verdicts.values() if isinstance(v, Accepted)]
    rejected = len(verdicts) - len(accepted)
    flagged = sum((v.jump is not None) + (v.mark_jump is not None) for v in accepted)
    before = min(verdicts, default=skipped)
    return Summary(len(accepted), rejected, rejected, flagged, before, seconds, retries)


def handle_live(
    ingestor: Ingestor, feed: BinanceFeed, message: object, after: OrderKey | None = None
) -> BinanceFeed:
    """One exchange payload: publish what it implies (but what is at or before `after`,
    published by an attempt a failure cut short), or dead-letter it; commit, then keep
    the feed's state if it moved."""
    try:
        moved, events = feed.on_message(message, time.time_ns())
    except FeedError as exc:
        raw = message if isinstance(message, bytes) else str(message).encode("utf-8")
        ingestor.dead_letter(feed.symbol, raw[:4096], Rejected(Reason.PARSE, str(exc)))
        moved, events = feed, []
    for event in Resume(events, after):
        ingestor.submit(event)
    ingestor.commit()
    kept = moved.fields()
    if kept != feed.fields():
        ingestor.store.save_feed_fields(feed.symbol, kept)
    return moved


async def run_live(
    build: Callable[[], Ingestor],
    symbol: str,
    connect: Callable[[], AsyncIterator[object]],
    failed: Callable[[Exception], Awaitable[None]],
) -> None:
    """The live loop (blocking Kafka/Redis work in a worker thread) over the exchange's
    messages, from `connect()`. A failure goes to `failed` (which raises if it is not
    transient, else waits). One of the broker or Redis: a fresh ingestor takes the
    message in hand again, skipping what the cut-short attempt had published. One of the
    exchange's stream: that stream is over, so the next attempt connects afresh (else
    the loop would end as if the feed had, and report healthy while publishing nothing).
    Returns when a stream ends. The feed goes on from its stored state (a funding
    announced before a restart is settled after it). The symbol's lease is taken before
    anything is read or connected: on standby (another ingestion holds the symbol) the
    exchange's stream is dropped, and the feed and the message in hand are the holder's
    to publish; the feed is read afresh once this one takes over. A lease of this one's
    that lapsed (a stall, Redis out of reach) is a failure like the others: taken back,
    the message in hand goes on past what was published (`after`), from the feed as it
    was before it (the stored feed keeps no last trade: the same millisecond's next
    trade took the stamp of the one published, and was skipped as published)."""
    feed: BinanceFeed | None = None
    messages: AsyncIterator[object] | None = None
    in_hand: object | None = None
    while True:
        try:
            ingestor = await asyncio.to_thread(build)
            last = (await asyncio.to_thread(ingestor.state, symbol)).last_key  # the lease
            if feed is None:
                stored = await asyncio.to_thread(ingestor.store.feed_fields, symbol)
                feed = BinanceFeed.from_fields(symbol, stored)
            if in_hand is not None:
                feed = await asyncio.to_thread(handle_live, ingestor, feed, in_hand, last)
                in_hand = None
            while True:
                if messages is None:
                    messages = connect()
                try:
                    in_hand = await anext(messages)
                except StopAsyncIteration:
                    return
                except Exception:
                    messages = None
                    raise
                feed = await asyncio.to_thread(handle_live, ingestor, feed, in_hand)
                in_hand = None
        except SymbolTaken as exc:
            if messages is not None:  # a standby holds no stream: its queue only grows
                with contextlib.suppress(Exception):
                    await messages.aclose()  # type: ignore[attr-defined]
            feed, messages, in_hand = None, None, None
            await failed(exc)
        except Exception as exc:  # `failed` raises what is not transient
            await failed(exc)


async def ccxt_messages(
    symbol: str, exchange_id: str = "binanceusdm", retry_s: float = 5.0
) -> AsyncIterator[object]:
    """Raw Binance payloads (`info` of ccxt.pro's unified trades and mark-price tickers)
    for one symbol; network errors are retried, anything else ends the stream."""
    import ccxt.pro

    exchange = getattr(ccxt.pro, exchange_id)({"newUpdates": True})
    market = ccxt_symbol(symbol)
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=10_000)

    async def watch(call: Callable[[], object], many: bool) -> None:
        while True:
            try:
                result = await call()  # type: ignore[misc]
            except ccxt.NetworkError:
                await asyncio.sleep(retry_s)
                continue
            for item in result if many else [result]:
                await queue.put(item["info"])

    watchers = [
        asyncio.create_task(
            watch(lambda: exchange.watch_trades(market, params={"name": "aggTrade"}), True)
        ),
        asyncio.create_task(watch(lambda: exchange.watch_mark_price(market), False)),
    ]
    try:
        while True:
            getter = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({getter, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                for task in done:
                    task.result()  # re-raise why a watcher stopped
            yield getter.result()
    finally:
        for task in watchers:
            task.cancel()
        with contextlib.suppress(Exception):
            await exchange.close()
