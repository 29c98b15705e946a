"""The ingestion command line refuses a user's mistakes with one clear line (exit 2),
before it reaches for the broker: no traceback."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.ingestion import main as ingestion_main
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
        ("seed", "-1", "greater than or equal to 0"),  # the same path as seed 1
        ("synthetic_ticks", "100000000", "less than or equal to 5000000"),  # out of memory
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


@needs_data
def test_a_replay_says_what_its_files_left_out(tmp_path: Path) -> None:
    """The backtest prints each file's load report; a replay published through gaps and
    skipped rows without a word at any log level."""
    from services.ingestion.main import finite_events
    from shared.logging import configure_logging

    def reports() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        out.seek(0)
        out.truncate()
        return [line for line in lines if line["event"] == "load_report"]

    assert PERP is not None
    lines = PERP.read_text().splitlines(keepends=True)
    holed = tmp_path / "BTCUSDT_perp_1h_holed.csv"
    holed.write_text("".join(lines[:101] + lines[104:201]))  # 3 hours cut out
    out = io.StringIO()
    configure_logging("ingestion", "INFO", stream=out)
    try:
        assert list(finite_events(IngestionSettings(source="replay", data=holed)))
        (report,) = reports()
        assert report["level"] == "warning"
        assert (report["gaps"], report["missing"]) == (1, 3)
        assert "1 gap(s) totalling 3 missing bar(s)" in str(report["summary"])
        window = {"start": "2021-01-01", "end": "2021-01-03"}
        assert list(finite_events(IngestionSettings(source="replay", data=PERP, **window)))
        assert [r["level"] for r in reports()] == ["info"]
    finally:
        configure_logging("ingestion", "INFO")


def test_a_flag_not_given_leaves_its_setting_to_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parser's own defaults replaced the environment's: SMARTLEV_INGESTION_SYMBOL=
    ETH-USDT published BTC-USDT without a word (from a review)."""
    seen: list[IngestionSettings] = []
    monkeypatch.setattr(ingestion_main, "run_once", lambda settings: seen.append(settings) or 0)
    for name, value in {
        "SYMBOL": "ETH-USDT",
        "SCENARIO": "gaps",
        "SYNTHETIC_TICKS": "500",
        "SPEED": "10",
    }.items():
        monkeypatch.setenv(f"SMARTLEV_INGESTION_{name}", value)
    assert main(["synthetic", "--seed", "1"]) == 0
    taken = seen[-1]
    assert (taken.symbol, taken.scenario, taken.synthetic_ticks, taken.speed) == (
        "ETH-USDT",
        "gaps",
        500,
        "10",
    )
    assert main(["synthetic", "--seed", "1", "--symbol", "BTC-USDT", "--ticks", "7"]) == 0
    assert (seen[-1].symbol, seen[-1].synthetic_ticks, seen[-1].scenario) == (
        "BTC-USDT",
        7,
        "gaps",
    )  # a flag given wins
