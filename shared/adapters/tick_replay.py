"""Replay real market history as `market.ticks` messages (reusable by an ingestion service).

The same loaders (`shared.adapters.market_data`) and bar->tick interpolation
(`shared.core.bars.ticks_from_bars`) as the backtester, so a replay through Kafka sees
exactly the ticks a backtest sees. Funding settlements are merged in time order; on an
equal timestamp the funding comes first (it settles on the position held before it).
Each event gets the per-symbol `seq` (1, 2, ...) and a deterministic `event_id`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kafka import KafkaProducer
from smartlev.v1 import market_pb2

from shared import codec
from shared.adapters.market_data import LoadReport, load_market
from shared.backtest import market_events
from shared.core.bars import ticks_from_bars
from shared.core.market import NS_PER_HOUR, FundingRate, Tick
from shared.topics import MARKET_TICKS

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """$SMARTLEV_DATA_DIR, else <repo>/../shared/data."""
    override = os.environ.get("SMARTLEV_DATA_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


def file_stem(symbol: str) -> str:
    """ "BTC-USDT" -> "BTCUSDT" (the data files' naming)."""
    return symbol.replace("-", "")


def backtest_stream(
    data: Path,
    symbol: str,
    *,
    funding: Path | None = None,
    marks: Path | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    mode: Literal["ohlc", "close"] = "ohlc",
    interval_ns: int = NS_PER_HOUR,
    on_report: Callable[[LoadReport], None] | None = None,
) -> Iterator[Tick | FundingRate]:
    """Exactly the market events `smartlev backtest` feeds `run_backtest` for the same
    files and window (same loaders, `ticks_from_bars`, `market_events`), so a service
    replaying this stream and the backtester see the same ticks in the same order.
    `on_report` hears what each file's load tolerated (the backtest prints it)."""
    loaded = load_market(
        data,
        symbol,
        funding=funding,
        marks=marks,
        start_ns=start_ns,
        end_ns=end_ns,
        interval_ns=interval_ns,
    )
    if on_report is not None:
        for report in loaded.reports:
            on_report(report)
    ticks = ticks_from_bars(loaded.bars, interval_ns, loaded.marks, mode=mode)
    return market_events(ticks, loaded.rates)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaySource:
    symbol: str = "BTC-USDT"
    directory: Path | None = None
    mode: Literal["ohlc", "close"] = "ohlc"
    with_marks: bool = True
    with_funding: bool = True
    start_ns: int | None = None
    end_ns: int | None = None

    @property
    def root(self) -> Path:
        return self.directory or data_dir()

    @property
    def source_name(self) -> str:
        return f"replay:{file_stem(self.symbol)}_perp_1h"

    def market_values(self) -> Iterator[Tick | FundingRate]:
        """Core ticks (and funding) in time order: the backtester's stream of the files
        (`backtest_stream`; its own merge let funding run on past `end_ns` to 2023)."""
        stem = file_stem(self.symbol)
        return backtest_stream(
            self.root / f"{stem}_perp_1h_2019_2023.csv",
            self.symbol,
            funding=self.root / f"{stem}_funding_8h_2019_2023.csv" if self.with_funding else None,
            marks=self.root / f"{stem}_mark_1h_2019_2023.csv" if self.with_marks else None,
            start_ns=self.start_ns,
            end_ns=self.end_ns,
            mode=self.mode,
        )

    def events(
        self, limit: int | None = None, clock_ns: Callable[[], int] = time.time_ns
    ) -> Iterator[market_pb2.MarketEvent]:
        """MarketEvent messages, seq from 1; `limit` counts ticks (funding rides along)."""
        ticks = 0
        for seq, value in enumerate(self.market_values(), start=1):
            if limit is not None and ticks >= limit:
                return
            if isinstance(value, Tick):
                ticks += 1
                yield codec.market_event_from_tick(
                    value, seq=seq, source=self.source_name, ts_init_ns=clock_ns()
                )
            else:
                yield codec.market_event_from_funding(
                    value, seq=seq, source=self.source_name, ts_init_ns=clock_ns()
                )


def event_symbol(event: market_pb2.MarketEvent) -> str:
    which = event.WhichOneof("event")
    if which is None:
        raise ValueError("empty MarketEvent")
    return str(getattr(event, which).symbol)


def make_producer(bootstrap: str, **overrides: object) -> KafkaProducer:
    """A kafka-python producer for protobuf values and UTF-8 keys, safe defaults:
    acks=all + idempotence so a retry never duplicates or reorders within a partition."""
    config: dict[str, object] = {
        "bootstrap_servers": bootstrap.split(","),
        "key_serializer": codec.key_serializer,
        "value_serializer": codec.serializer,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        # kafka-python's own sensors, read by nothing here (the services export
        # Prometheus): ~10% of its network thread's CPU per produce request.
        "metrics_enabled": False,
        "client_id": "smartlev-replay",
    }
    config.update(overrides)
    return KafkaProducer(**config)


def publish(
    producer: KafkaProducer,
    events: Iterable[market_pb2.MarketEvent],
    topic: str = MARKET_TICKS.name,
    on_sent: Callable[[int], None] | None = None,
) -> int:
    """Send events keyed by symbol, in order; flush and return how many were sent.
    Raises if the broker rejected any of them."""
    futures = []
    for count, event in enumerate(events, start=1):
        futures.append(producer.send(topic, key=event_symbol(event), value=event))
        if on_sent is not None:
            on_sent(count)
    producer.flush()
    for future in futures:
        future.get(timeout=30)
    return len(futures)
