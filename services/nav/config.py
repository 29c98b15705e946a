"""NAV service settings (env prefix SMARTLEV_NAV_)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import ServiceSettings, service_config


class NavSettings(ServiceSettings):
    model_config = service_config("nav")

    service: str = "nav"
    metrics_port: int = Field(default=9105, ge=0, le=65535)
