"""`smartlev reconcile` exits 1 only when the books differ: a Redis URL or a Kafka
address it cannot read is a usage error (2, one line), not an imbalance, and nothing is
read."""

from __future__ import annotations

import pytest

from shared.core.config import StrategyConfig
from shared.reconcile import run

DEFAULTS = StrategyConfig()


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://127.0.0.1:abc/0", ""])
def test_a_redis_url_it_cannot_read_is_a_usage_error(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("t.", ["BTC-USDT"], "127.0.0.1:1", url, DEFAULTS) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --redis-url {url!r}: ") and err.count("\n") == 1


@pytest.mark.parametrize("bootstrap", ["127.0.0.1:abc", "", "host"])
def test_a_kafka_address_it_cannot_read_is_a_usage_error(
    bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It ended in a ValueError traceback, exit 1: the code for "books differ"."""
    assert run("t.", ["BTC-USDT"], bootstrap, "redis://127.0.0.1:1/0", DEFAULTS) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --bootstrap: ") and err.count("\n") == 1
    assert "host:port" in err
