"""Service settings from the environment (pydantic-settings).

Convention: every service subclasses `ServiceSettings` in `services/<name>/config.py`
with its own prefix `SMARTLEV_<NAME>_`, and the shared connection settings nest under
`KAFKA__` / `REDIS__`:

    class RegimeSettings(ServiceSettings):
        model_config = service_config("regime")      # env prefix SMARTLEV_REGIME_
        service: str = "regime"
        bar_seconds: int = 3600

    SMARTLEV_REGIME_KAFKA__BOOTSTRAP=broker:9092
    SMARTLEV_REGIME_REDIS__URL=redis://cache:6379/0
    SMARTLEV_REGIME_LOG_LEVEL=DEBUG
    SMARTLEV_REGIME_METRICS_PORT=9102

Settings objects are frozen; a bad value stops the service at start with pydantic's
message naming the variable. Defaults point at the local stack (scripts/stack.sh).
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from codecs import BOM_UTF8
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from shared.core.config import StrategyConfig

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
# Durations in seconds, finite and at most a day (an infinite health interval was taken:
# Redis probed once at start, health SERVING for good after it went away).
Seconds = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)]
SecondsOrZero = Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]


def is_host_port(text: str) -> bool:
    """`host:port`, the port 1-65535 (gRPC takes a larger one modulo 65536: 116527 is
    50991, another server)."""
    host, _, port = text.rpartition(":")
    # ASCII digits only: str.isdigit also takes "²" (then int() raises) and "５"
    return bool(host.strip()) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535


def _host_port(value: str) -> str:
    if not is_host_port(value):
        raise ValueError(f"expected host:port (port 1-65535), got {value!r}")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


class KafkaSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap: str = "127.0.0.1:9092"
    client_id: str = "smartlev"
    replication: int = Field(default=1, ge=1)

    @field_validator("bootstrap")
    @classmethod
    def _hosts(cls, value: str) -> str:
        hosts = [h.strip() for h in value.split(",") if h.strip()]
        if not hosts or not all(is_host_port(h) for h in hosts):
            raise ValueError(f"expected host:port[,host:port...] (port 1-65535), got {value!r}")
        return ",".join(hosts)

    @property
    def faust_broker(self) -> str:
        """The broker URL faust wants: kafka://host:port;host:port."""
        return ";".join(f"kafka://{h}" for h in self.bootstrap.split(","))


class RedisSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "redis://127.0.0.1:6379/0"

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected redis://, rediss:// or unix:// URL, got {value!r}")
        return value


STRATEGY_VARIABLE = "SMARTLEV_STRATEGY_CONFIG"


def load_strategy(path: Path | str | None) -> StrategyConfig:
    """Defaults, overridden by a TOML or JSON file (none, or an empty name: the
    defaults); unknown keys are refused."""
    if path is None or not str(path):
        return StrategyConfig()
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc.strerror}") from None
    # JSON by its name, or by its first character (no TOML document starts with "{"):
    # compose mounts the caller's file, whatever its name, as policy.toml
    is_json = path.suffix == ".json" or text.removeprefix(BOM_UTF8).lstrip().startswith(b"{")
    try:
        data = json.loads(text) if is_json else tomllib.loads(text.decode("utf-8-sig"))
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(
            f"config {path} is not valid {'json' if is_json else 'toml'}: {exc}"
        ) from None
    try:
        return StrategyConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"config {path}:\n{exc}") from None


def _strategy_file(value: Any) -> Any:
    """The environment names a file (empty: the defaults); code passes the config."""
    return load_strategy(value) if isinstance(value, str | Path) else value


Settings = TypeVar("Settings", bound="ServiceSettings")


def from_environment(kind: type[Settings]) -> Settings:
    """A service's settings, or exit 2 with pydantic's message, which names each setting
    that is wrong (a traceback above it said nothing more)."""
    try:
        return kind()
    except (ValidationError, SettingsError) as exc:  # SettingsError: a nested one not JSON
        print(f"{kind.__name__}: bad settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def service_config(name: str) -> SettingsConfigDict:
    """The model_config for a service's settings: prefix SMARTLEV_<NAME>_, nested `__`."""
    return SettingsConfigDict(
        env_prefix=f"SMARTLEV_{name.upper()}_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )


class ServiceSettings(BaseSettings):
    """Base for every service's settings; see the module doc for the convention."""

    model_config = service_config("service")

    service: str = "smartlev"
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    log_level: LogLevel = "INFO"
    metrics_port: int = Field(default=0, ge=0, le=65535)  # 0: no metrics endpoint
    # /metrics and /healthz: loopback, as everything else natively; a container sets
    # 0.0.0.0 (docker-compose.yml), its port published on the host's loopback only.
    metrics_host: str = "127.0.0.1"
    # Prefix of every topic name, Redis key and consumer group: isolates a pipeline (tests).
    namespace: str = Field(default="", pattern=r"^[a-z0-9_.-]*$")
    # The policy, fees and venue model every stage applies: one TOML or JSON file for the
    # whole pipeline (`SMARTLEV_STRATEGY_CONFIG`, no service prefix: the gateway must
    # quote the fees hedging charges), read as `smartlev backtest --config` reads it.
    # Code passes its own with `model_copy(update={"strategy": ...})`.
    strategy: Annotated[StrategyConfig, NoDecode, BeforeValidator(_strategy_file)] = Field(
        default_factory=StrategyConfig, validation_alias=STRATEGY_VARIABLE
    )

    @model_validator(mode="before")
    @classmethod
    def _one_policy_variable(cls, data: Any) -> Any:
        """A stage's own policy (`SMARTLEV_HEDGING_STRATEGY=...`, or one figure of it) would
        charge or quote other fees than the rest: refused, naming it, not ignored."""
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        stray = sorted(
            name
            for name in os.environ
            if name.upper().startswith((f"{prefix}STRATEGY", f"{STRATEGY_VARIABLE}__"))
        )
        if stray:
            raise ValueError(
                f"{', '.join(stray)}: the policy is {STRATEGY_VARIABLE}, one file for every "
                "stage (a stage's own would charge or quote other fees than the rest)"
            )
        return data

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka.bootstrap

    @property
    def redis_url(self) -> str:
        return self.redis.url
