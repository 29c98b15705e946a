"""Settings of the leverage service (env prefix SMARTLEV_LEVERAGE_)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import ServiceSettings, service_config


class LeverageSettings(ServiceSettings):
    model_config = service_config("leverage")

    service: str = "leverage"
    metrics_port: int = Field(default=9103, ge=0, le=65535)
