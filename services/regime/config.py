"""Settings of the regime service (env prefix SMARTLEV_REGIME_)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import ServiceSettings, service_config


class RegimeSettings(ServiceSettings):
    model_config = service_config("regime")

    service: str = "regime"
    metrics_port: int = Field(default=9102, ge=0, le=65535)
