"""Service settings refuse what cannot work when they are read, saying which setting:
a duration that is not a finite number of seconds, a Kafka address without a port."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from services.gateway.config import GatewaySettings
from services.hedging.config import HedgingSettings
from services.ingestion.config import IngestionSettings
from services.leverage.config import LeverageSettings
from services.nav.config import NavSettings
from services.regime.config import RegimeSettings
from services.venue.config import VenueSettings
from shared import serving
from shared.core.config import StrategyConfig
from shared.settings import from_environment, load_strategy

SETTINGS = {
    "GATEWAY": GatewaySettings,
    "HEDGING": HedgingSettings,
    "VENUE": VenueSettings,
    "INGESTION": IngestionSettings,
}


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


@pytest.mark.parametrize(
    ("env", "value", "refused"),
    [
        ("SMARTLEV_GATEWAY_MIN_ORDER", "1000000.01", "min_order .* must be at most max_order"),
        ("SMARTLEV_GATEWAY_MAX_NAV_AGE_S", "0.5", "max_nav_age_s"),
        ("SMARTLEV_HEDGING_VENUE_ADDRESS", "127.0.0.1:116527", r"host:port \(port 1-65535\)"),
        ("SMARTLEV_HEDGING_VENUE_ADDRESS", "127.0.0.1", r"host:port \(port 1-65535\)"),
        ("SMARTLEV_VENUE_APPLIED_IDS_KEPT", "9999", "0 \\(all\\) or at least 10,000"),
        (
            "SMARTLEV_INGESTION_RETRY_BACKOFF_S",
            "11",
            "retry_backoff_s .* at most retry_backoff_max",
        ),
    ],
)
def test_settings_that_leave_nothing_to_do_or_break_a_rule_are_refused(
    env: str, value: str, refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each was taken: a minimum order above the maximum refused every open; a NAV age
    under a second left nothing tradable; a venue address past port 65535 reached
    another port (gRPC takes it modulo 65536), none went to 443; remembering fewer
    venue call ids than a step makes applied a repeated step's first calls again; a
    backoff above its own maximum."""
    settings = SETTINGS[env.split("_")[1]]
    settings()  # the defaults are fine
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=refused):
        settings()


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("SMARTLEV_GATEWAY_MIN_ORDER", "1000000"),
        ("SMARTLEV_GATEWAY_MAX_NAV_AGE_S", "1"),
        ("SMARTLEV_HEDGING_VENUE_ADDRESS", "[::1]:50052"),
        ("SMARTLEV_VENUE_APPLIED_IDS_KEPT", "0"),
        ("SMARTLEV_VENUE_APPLIED_IDS_KEPT", "10000"),
        ("SMARTLEV_INGESTION_RETRY_BACKOFF_S", "10"),
    ],
)
def test_the_edges_of_those_rules_are_taken(
    env: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = SETTINGS[env.split("_")[1]]
    monkeypatch.setenv(env, value)
    assert str(getattr(settings(), env.split("_", 2)[2].lower())) in {value, f"{value}.0"}


# --- the strategy config every stage applies --------------------------------------------

ALL_SETTINGS = [
    GatewaySettings,
    HedgingSettings,
    IngestionSettings,
    LeverageSettings,
    NavSettings,
    RegimeSettings,
    VenueSettings,
]
POLICY = """
[accounting]
open_fee = "0.002"

[leverage]
l_max = 3.0

[instruments.BTC-USDT]
price_tick = "0.1"
lot_step = "0.001"
"""


def test_every_stage_applies_the_one_policy_file_the_environment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services built the defaults whatever was configured: a policy backtested with
    `--config` could not be run (from a review)."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    monkeypatch.setenv("SMARTLEV_STRATEGY_CONFIG", str(policy))
    applied = {kind.__name__: kind().strategy for kind in ALL_SETTINGS}
    expected = load_strategy(policy)
    assert expected.accounting.open_fee == Decimal("0.002") and expected.leverage.l_max == 3.0
    assert all(strategy == expected for strategy in applied.values()), applied
    assert expected.digest() != StrategyConfig().digest()
    # the file's instruments are the ones ingestion takes
    with pytest.raises(ValidationError, match="unknown symbol 'ETH-USDT'; configured: BTC-USDT"):
        IngestionSettings(symbol="ETH-USDT")


@pytest.mark.parametrize("value", ["", None])
def test_no_policy_file_is_the_defaults(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("SMARTLEV_STRATEGY_CONFIG", raising=False)
    else:
        monkeypatch.setenv("SMARTLEV_STRATEGY_CONFIG", value)
    assert all(kind().strategy == StrategyConfig() for kind in ALL_SETTINGS)


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("missing.toml", None, "cannot read config .*missing.toml: No such file"),
        ("bad.toml", "[accounting\n", "bad.toml is not valid toml"),
        ("bad.json", "{", "bad.json is not valid json"),
        ("unknown.toml", "[accounting]\nopen_fees = 1\n", "open_fees"),
        ("unsafe.toml", '[accounting]\nopen_fee = "1.5"\n', "open_fee"),
    ],
)
def test_a_policy_file_that_cannot_be_applied_stops_the_service_saying_why(
    name: str, text: str | None, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("SMARTLEV_STRATEGY_CONFIG", str(path))
    for kind in ALL_SETTINGS:
        with pytest.raises(ValidationError, match="SMARTLEV_STRATEGY_CONFIG") as refused:
            kind()
        assert re.search(reason, str(refused.value)), str(refused.value)


def test_code_passes_a_policy_as_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run services in-process with a config of their own."""
    monkeypatch.delenv("SMARTLEV_STRATEGY_CONFIG", raising=False)
    cheap = StrategyConfig.model_validate({"accounting": {"open_fee": "0"}})
    assert GatewaySettings().model_copy(update={"strategy": cheap}).strategy == cheap


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMARTLEV_HEDGING_STRATEGY", "policy.toml"),
        ("SMARTLEV_HEDGING_STRATEGY__ACCOUNTING__OPEN_FEE", "0.002"),
        ("smartlev_hedging_strategy_config", "policy.toml"),
        ("SMARTLEV_STRATEGY_CONFIG__ACCOUNTING__OPEN_FEE", "0.002"),
    ],
)
def test_a_stages_own_policy_is_refused_naming_it(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a policy of its own, hedging charged 0.2% while the gateway quoted 0.1%, and
    every deposit was refused as quoted otherwise (from a review)."""
    monkeypatch.delenv("SMARTLEV_STRATEGY_CONFIG", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=f"{name}: the policy is SMARTLEV_STRATEGY_CONFIG"):
        HedgingSettings()
    if not name.upper().startswith("SMARTLEV_STRATEGY_CONFIG"):
        assert GatewaySettings().strategy == StrategyConfig()  # another stage's: not its


def test_a_nested_setting_that_is_not_json_says_which_in_one_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SMARTLEV_NAV_KAFKA", "kafka:9092")  # for SMARTLEV_NAV_KAFKA__BOOTSTRAP
    with pytest.raises(SystemExit) as stopped:
        from_environment(NavSettings)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("NavSettings: bad settings:\n") and '"kafka"' in err


def test_a_service_says_which_policy_it_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stages started with different files disagree on fees or rules: each shows the
    digest of its own on /metrics, one a scrape can compare across stages."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    monkeypatch.setenv("SMARTLEV_STRATEGY_CONFIG", str(policy))
    monkeypatch.setattr(serving, "configure_logging", lambda *args: None)
    serving.enter("nav", NavSettings())
    digest = load_strategy(policy).digest()
    assert REGISTRY.get_sample_value("smartlev_strategy_config_info", {"digest": digest}) == 1
    monkeypatch.delenv("SMARTLEV_STRATEGY_CONFIG")
    serving.enter("nav", NavSettings())
    default = StrategyConfig().digest()
    assert REGISTRY.get_sample_value("smartlev_strategy_config_info", {"digest": default}) == 1
    assert REGISTRY.get_sample_value("smartlev_strategy_config_info", {"digest": digest}) is None


def test_a_service_started_with_a_bad_setting_says_which_in_one_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No traceback above pydantic's message; exit 2, as ingestion's command line."""
    monkeypatch.setenv("SMARTLEV_STRATEGY_CONFIG", "/nonexistent/policy.toml")
    with pytest.raises(SystemExit) as stopped:
        from_environment(NavSettings)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("NavSettings: bad settings:\n") and "Traceback" not in err
    assert "SMARTLEV_STRATEGY_CONFIG" in err and "/nonexistent/policy.toml" in err
    monkeypatch.delenv("SMARTLEV_STRATEGY_CONFIG")
    assert from_environment(NavSettings).strategy == StrategyConfig()


def test_a_json_policy_loads_whatever_its_name(tmp_path: Path) -> None:
    """compose mounts the caller's file as policy.toml: a JSON one was read as TOML and
    every service refused to start (from a review)."""
    mounted = tmp_path / "policy.toml"
    mounted.write_text('  {"leverage": {"l_max": 2.5}}')
    assert load_strategy(mounted).leverage.l_max == 2.5
    mounted.write_bytes(b'\xef\xbb\xbf{"leverage": {"l_max": 2.5}}')  # a BOM before it
    assert load_strategy(mounted).leverage.l_max == 2.5
    mounted.write_bytes(b"\xef\xbb\xbf[leverage]\nl_max = 2.5\n")  # TOML, a BOM before it
    assert load_strategy(mounted).leverage.l_max == 2.5
    mounted.write_text('{"leverage": ')
    with pytest.raises(ValueError, match=r"policy\.toml is not valid json"):
        load_strategy(mounted)


def test_a_stream_queue_holds_every_products_latest_nav(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full queue keeps each product's latest NAV; one smaller than the products (4 at
    the defaults) dropped whole products' only updates (from a review)."""
    monkeypatch.setenv("SMARTLEV_GATEWAY_STREAM_QUEUE", "3")
    with pytest.raises(ValidationError, match=r"stream_queue \(3\) must be at least .* \(4\)"):
        GatewaySettings()
    monkeypatch.setenv("SMARTLEV_GATEWAY_STREAM_QUEUE", "4")
    assert GatewaySettings().stream_queue == 4
