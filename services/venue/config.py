"""Venue settings: env prefix SMARTLEV_VENUE_ (see shared/settings.py)."""

from __future__ import annotations

from pydantic import Field, field_validator

from shared.core.venue import MIN_CALL_IDS_KEPT
from shared.settings import Seconds, SecondsOrZero, ServiceSettings, service_config


class VenueSettings(ServiceSettings):
    model_config = service_config("venue")

    service: str = "venue"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50052, ge=0, le=65535)  # 0: any free port (tests)
    metrics_port: int = Field(default=9106, ge=0, le=65535)
    health_interval_s: Seconds = 1.0  # how often Redis is probed
    grace_s: SecondsOrZero = 5.0  # in-flight calls finish on SIGTERM
    # Call ids remembered per symbol, the newest (0: all, forever; a record ~450 bytes,
    # ~530 with its place in the order). A
    # caller repeats only the calls of the step it was in (hedging: the market batch or
    # order it had begun: a rebalance is one call per 2M of notional), so this must
    # exceed the calls of the largest such step, or a repeat past it applies again.
    applied_ids_kept: int = Field(default=100_000, ge=0)

    @field_validator("applied_ids_kept")
    @classmethod
    def _more_than_a_step(cls, value: int) -> int:
        if 0 < value < MIN_CALL_IDS_KEPT:
            raise ValueError(
                f"must be 0 (all) or at least {MIN_CALL_IDS_KEPT:,}: a repeated step of more "
                "calls than are remembered applies its first ones again"
            )
        return value
