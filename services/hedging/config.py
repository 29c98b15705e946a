"""Hedging settings: env prefix SMARTLEV_HEDGING_ (see shared/settings.py)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import HostPort, Seconds, ServiceSettings, service_config


class HedgingSettings(ServiceSettings):
    model_config = service_config("hedging")

    service: str = "hedging"
    metrics_port: int = Field(default=9104, ge=0, le=65535)
    venue_address: HostPort = "127.0.0.1:50052"  # the venue service's gRPC address
    venue_timeout_s: Seconds = 10.0  # per call, retries included
    retry_backoff_s: Seconds = 1.0  # between attempts at a failed event
