"""Gateway settings: env prefix SMARTLEV_GATEWAY_ (see shared/settings.py).

Clients (shared/cli.py, the benchmark) reach the gateway at `grpc_host:grpc_port` and
send `authorization: Bearer <api key>`. Keys map to users through `api_keys_file` (TOML,
`[users.<user>] key_sha256 = "<hex>"`) and/or `api_keys` (env
`SMARTLEV_GATEWAY_API_KEYS='{"<user>": "<sha256 hex of the key>"}'`); only hashes are
stored. The committed `api_keys.toml` holds two local development users, for local use
only: `alice` with key `dev-alice-key` and `bob` with key `dev-bob-key`.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from shared.core.accounting import MAX_DEPOSIT
from shared.core.products import SIDES
from shared.settings import Seconds, SecondsOrZero, ServiceSettings, service_config

DEFAULT_KEYS_FILE = Path(__file__).with_name("api_keys.toml")


class GatewaySettings(ServiceSettings):
    model_config = service_config("gateway")

    service: str = "gateway"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)  # 0: any free port (tests)
    metrics_port: int = Field(default=9107, ge=0, le=65535)
    # The committed dev users' file is the default only while no keys are configured:
    # keys in the environment replace it (name a file too to keep both; "": none).
    api_keys_file: Path | None = DEFAULT_KEYS_FILE
    api_keys: dict[str, str] = Field(default_factory=dict)  # user -> sha256(key) hex
    # Order limits (USDT amounts, inclusive) and precision.
    min_order: Decimal = Field(default=Decimal("10"), gt=0)
    max_order: Decimal = Field(default=Decimal("1000000"), gt=0, le=MAX_DEPOSIT)  # hedging's
    amount_decimals: int = Field(default=8, ge=0, le=8)
    units_decimals: int = Field(default=8, ge=0, le=8)
    # A request larger than this is INVALID_ARGUMENT, saying its size; the transport takes
    # up to transport_max_bytes (beyond: RESOURCE_EXHAUSTED before any handler runs).
    max_message_bytes: int = Field(default=64 * 1024, ge=1024)
    transport_max_bytes: int = Field(default=1024 * 1024, ge=1024, le=2**31 - 1)  # gRPC: int32
    # A NAV older than this (wall clock since the NAV service wrote it) is not traded on;
    # at least a second (a NAV is written after its price came through four services).
    max_nav_age_s: float = Field(default=120.0, ge=1, le=86_400, allow_inf_nan=False)
    outbox_poll_s: Seconds = 0.5  # relay sweep when nothing signals it
    # The relay's sweeps begin at most this often, so under load the orders settled
    # meanwhile share one (one Redis read, one produce request, one delete): hedging then
    # sees an order up to this much later; after a quiet spell, at once.
    outbox_interval_s: SecondsOrZero = 0.05
    # Outbox entries a sweep reads, publishes and deletes at a time (~0.5 MB of events).
    outbox_window: int = Field(default=1000, ge=1, le=5000)
    health_interval_s: Seconds = 1.0
    grace_s: SecondsOrZero = 5.0  # in-flight calls finish on SIGTERM
    stream_queue: int = Field(default=256, ge=1)  # updates buffered per stream subscriber
    # Open streams (StreamNav and StreamPositions together) a user may hold on this
    # gateway; past it RESOURCE_EXHAUSTED. Every NAV update is offered to every stream:
    # one key's thousands of idle streams would make each update cost everyone.
    max_streams_per_user: int = Field(default=32, ge=1)
    # A connection quiet this long is pinged; a peer that does not answer within
    # keepalive_timeout_s is dropped, and its streams end: a client that vanished without
    # closing TCP (a dropped network, a frozen host) held its streams for TCP's two hours.
    keepalive_s: float = Field(default=60.0, ge=1, le=86_400, allow_inf_nan=False)  # whole ms
    keepalive_timeout_s: float = Field(default=20.0, ge=1, le=86_400, allow_inf_nan=False)

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _no_file(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="before")
    @classmethod
    def _dev_keys_only_by_default(cls, data: object) -> object:
        """Keys set in the environment replace the dev users (whose keys are public: in
        the README) unless a keys file is named as well."""
        if isinstance(data, dict) and data.get("api_keys") and "api_keys_file" not in data:
            return {**data, "api_keys_file": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        """Limits that leave something to do: a transport that takes what the gateway
        checks, and an order size both limits allow (min_order above max_order refused
        every open, each amount below one or above the other)."""
        if self.transport_max_bytes < self.max_message_bytes:
            raise ValueError(
                f"transport_max_bytes ({self.transport_max_bytes}) must be at least "
                f"max_message_bytes ({self.max_message_bytes})"
            )
        if self.min_order > self.max_order:
            raise ValueError(
                f"min_order ({self.min_order}) must be at most max_order ({self.max_order})"
            )
        # a full queue keeps each product's latest NAV: one smaller than the products
        # dropped a product's only update for good (a NAV stream reads no state afresh)
        products = len(SIDES) * len(self.strategy.instruments)
        if self.stream_queue < products:
            raise ValueError(
                f"stream_queue ({self.stream_queue}) must be at least the number of "
                f"products ({products})"
            )
        return self
