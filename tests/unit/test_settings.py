"""Service settings refuse what cannot work when they are read, saying which setting:
a duration that is not a finite number of seconds, a Kafka address without a port."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.config import GatewaySettings
from services.venue.config import VenueSettings


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e9"])
def test_a_duration_is_a_finite_number_of_seconds_up_to_a_day(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An infinite health interval was taken: Redis probed once, SERVING for good."""
    monkeypatch.setenv("SMARTLEV_VENUE_HEALTH_INTERVAL_S", value)
    with pytest.raises(ValidationError, match="health_interval_s"):
        VenueSettings()


def test_the_gateways_largest_order_is_one_hedging_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above hedging's largest deposit (MAX_DEPOSIT), an order the gateway credited would
    be refused by the books."""
    monkeypatch.setenv("SMARTLEV_GATEWAY_MAX_ORDER", "1000000001")
    with pytest.raises(ValidationError, match="max_order"):
        GatewaySettings()
    monkeypatch.setenv("SMARTLEV_GATEWAY_MAX_ORDER", "1000000000")
    assert GatewaySettings().max_order == 10**9


@pytest.mark.parametrize("name", ["KEEPALIVE_S", "KEEPALIVE_TIMEOUT_S"])
def test_keepalive_times_are_whole_seconds_or_more(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a millisecond they became 0 ms for gRPC."""
    monkeypatch.setenv(f"SMARTLEV_GATEWAY_{name}", "0.0004")
    with pytest.raises(ValidationError, match=name.lower()):
        GatewaySettings()


def test_the_transport_limit_is_one_grpc_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC takes a 32-bit message size: a larger one passed the settings, then stopped
    the gateway with a traceback (OverflowError) as its server was built."""
    monkeypatch.setenv("SMARTLEV_GATEWAY_TRANSPORT_MAX_BYTES", str(2**31))
    with pytest.raises(ValidationError, match="transport_max_bytes"):
        GatewaySettings()
    monkeypatch.setenv("SMARTLEV_GATEWAY_TRANSPORT_MAX_BYTES", str(2**31 - 1))
    assert GatewaySettings().transport_max_bytes == 2**31 - 1


def test_a_grace_period_may_be_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTLEV_GATEWAY_GRACE_S", "0")
    monkeypatch.setenv("SMARTLEV_GATEWAY_HEALTH_INTERVAL_S", "2.5")
    settings = GatewaySettings()
    assert (settings.grace_s, settings.health_interval_s) == (0, 2.5)


@pytest.mark.parametrize("bootstrap", ["host:abc", ":", ":9092", "host:99999", "host:0", "host"])
def test_a_kafka_address_is_host_and_port(bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTLEV_VENUE_KAFKA__BOOTSTRAP", bootstrap)
    with pytest.raises(ValidationError, match=r"host:port\[,host:port...\] \(port 1-65535\)"):
        VenueSettings()


def test_kafka_addresses_are_kept_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTLEV_VENUE_KAFKA__BOOTSTRAP", " a:9092, b.example:19092 ,[::1]:9093")
    assert VenueSettings().kafka.bootstrap == "a:9092,b.example:19092,[::1]:9093"
