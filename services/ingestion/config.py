"""Ingestion settings: env prefix SMARTLEV_INGESTION_ (see shared/settings.py).

`source` picks what `serve` runs; the CLI subcommands set the same fields from flags, so
`serve` and `replay`/`synthetic`/`live` share one code path.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.ingestion.synthetic import Scenario
from shared.adapters.market_data import parse_time
from shared.adapters.tick_replay import data_dir, file_stem
from shared.settings import Seconds, ServiceSettings, service_config

Source = Literal["idle", "replay", "synthetic", "live"]


class IngestionSettings(ServiceSettings):
    model_config = service_config("ingestion")

    service: str = "ingestion"
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    source: Source = "idle"  # idle: healthy, publishing nothing, waiting
    symbol: str = Field(default="BTC-USDT", pattern=r"^[A-Z0-9]+-[A-Z0-9]+$")
    # replay: the backtester's input files (defaults: ../shared/data for the symbol)
    data: Path | None = None
    funding: Path | None = None
    marks: Path | None = None
    start: str | None = None  # ISO-8601 UTC, first bar
    end: str | None = None  # ISO-8601 UTC, exclusive
    speed: str = "max"  # "max" or N: N x real time
    ticks: Literal["ohlc", "close"] = "ohlc"
    # synthetic (stress tests only)
    seed: int = Field(default=0, ge=0)  # random.Random(-n) is random.Random(n)
    # at most 5M: the path is built whole before it is sent (1e8 ran out of memory)
    synthetic_ticks: int = Field(default=10_000, ge=0, le=5_000_000)
    scenario: Scenario = "mixed"
    # live
    exchange: Literal["binance"] = "binance"
    # validation and delivery
    max_jump: Decimal = Field(default=Decimal("0.30"), gt=0)
    stale_after_s: Seconds = 60.0  # live/paced feeds: unhealthy after
    batch_size: int = Field(default=500, ge=1)  # events per ack wait at --speed max
    # broker or Redis down: rebuild and resume after a pause doubling up to the max
    retry_backoff_s: Seconds = 0.5
    retry_backoff_max_s: Seconds = 10.0
    # one ingestion per symbol: a crashed one's successor waits its lease out (store.py)
    lease_ttl_s: float = Field(default=5.0, ge=0.5, le=300.0)

    @model_validator(mode="after")
    def _backoff_within_its_max(self) -> IngestionSettings:
        if self.retry_backoff_s > self.retry_backoff_max_s:
            raise ValueError(
                f"retry_backoff_s ({self.retry_backoff_s}) must be at most "
                f"retry_backoff_max_s ({self.retry_backoff_max_s})"
            )
        return self

    @model_validator(mode="after")
    def _an_instrument(self) -> IngestionSettings:
        """A symbol no instrument has is refused by every stage after this one: say so
        before publishing it."""
        self.strategy.instrument(self.symbol)  # ValueError names the configured ones
        return self

    @field_validator("start", "end")
    @classmethod
    def _iso_time(cls, value: str | None) -> str | None:
        parse_time(value)  # ValueError says what is wrong
        return value

    @field_validator("data", "funding", "marks")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("speed")
    @classmethod
    def _speed(cls, value: str) -> str:
        if value != "max":
            try:
                factor = float(value)
            except ValueError:
                raise ValueError(f"speed must be 'max' or a number > 0, got {value!r}") from None
            if not factor > 0 or factor == float("inf"):
                raise ValueError(f"speed must be 'max' or a number > 0, got {value!r}")
        return value

    @property
    def speed_factor(self) -> float | None:
        """None: as fast as possible; else the real-time multiplier."""
        return None if self.speed == "max" else float(self.speed)

    def replay_files(self) -> tuple[Path, Path | None, Path | None]:
        """(perp bars, funding, marks): the given files, else the symbol's shared data."""
        if self.data is not None:
            return self.data, self.funding, self.marks
        stem, root = file_stem(self.symbol), data_dir()
        return (
            root / f"{stem}_perp_1h_2019_2023.csv",
            self.funding or root / f"{stem}_funding_8h_2019_2023.csv",
            self.marks or root / f"{stem}_mark_1h_2019_2023.csv",
        )
