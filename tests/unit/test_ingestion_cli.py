"""The ingestion command line refuses a user's mistakes with one clear line (exit 2),
before it reaches for the broker: no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.ingestion.config import IngestionSettings
from services.ingestion.main import main
from shared.adapters.market_data import parse_time
from shared.adapters.tick_replay import data_dir

PERP = next(Path(data_dir()).glob("BTCUSDT_perp_1h_*.csv"), None)  # None: not at hand
needs_data = pytest.mark.skipif(PERP is None, reason=f"real data not found at {data_dir()}")


def test_times_are_iso_8601_in_utc_unless_they_say_otherwise() -> None:
    assert parse_time("2021-05-12") == 1_620_777_600 * 10**9
    assert parse_time("2021-05-12T08:00:00Z") == (1_620_777_600 + 8 * 3600) * 10**9
    assert parse_time("2021-05-12T10:00:00+02:00") == (1_620_777_600 + 8 * 3600) * 10**9
    assert parse_time(None) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("start", "yesterday", "'yesterday' is not an ISO-8601 time"),
        ("end", "2021-13-01", "'2021-13-01' is not an ISO-8601 time"),
        ("data", "/nonexistent/perp.csv", "no such file: /nonexistent/perp.csv"),
        ("funding", "/nonexistent/funding.csv", "no such file"),
        ("symbol", "DOGE-USDT", "unknown symbol 'DOGE-USDT'; configured: BTC-USDT, ETH-USDT"),
    ],
)
def test_bad_settings_say_what_is_wrong(field: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        IngestionSettings(**{field: value})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "--data", "/nonexistent/perp.csv"], "no such file"),
        (["replay", "--data", str(PERP), "--start", "yesterday"], "is not an ISO-8601 time"),
        (["replay", "--data", str(data_dir() / "README.md")], "missing required column"),
        (  # BTC's prices published as ETH's, which the gateway then trades at
            ["replay", "--symbol", "ETH-USDT", "--data", str(PERP)],
            "the file is named for BTCUSDT, not ETH-USDT (ETHUSDT_...)",
        ),
    ],
)
@needs_data
def test_a_replay_of_something_that_is_not_the_data_stops_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@needs_data
def test_the_real_data_files_pass_the_file_check() -> None:
    assert IngestionSettings(data=PERP, start="2021-05-12").data == PERP
