"""The pipeline demo refuses times it cannot use before it starts any service (it had
started five, then failed with a traceback, and read an offset its replay did not)."""

from __future__ import annotations

import csv
from datetime import datetime

import pytest
from smartlev.v1 import common_pb2, nav_pb2

from services.ingestion.config import IngestionSettings
from shared import pipeline_demo
from shared.adapters.tick_replay import data_dir
from shared.pipeline_runner import replay_args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--start", "yesterday"], "'yesterday' is not an ISO-8601 time"),
        (["--end", "2021-13-01"], "'2021-13-01' is not an ISO-8601 time"),
        (["--start", "2021-05-02", "--end", "2021-05-01"], "is not before --end"),
    ],
)
def test_bad_times_stop_the_demo_before_anything_starts(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def must_not_run(*_: object) -> int:
        raise AssertionError("the demo started")

    monkeypatch.setattr(pipeline_demo, "run", must_not_run)
    with pytest.raises(SystemExit) as stopped:
        pipeline_demo.main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_start_with_an_offset_is_the_instant_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(pipeline_demo, "run", lambda args: seen.append(args.start_ns) or 0)
    assert pipeline_demo.main(["--start", "2021-05-12T10:00:00+02:00"]) == 0
    assert seen == [(1_620_777_600 + 8 * 3600) * 10**9]


@pytest.mark.skipif(
    not (data_dir() / "BTCUSDT_perp_1h_2019_2023.csv").exists(), reason="real data not found"
)
def test_the_progress_table_stays_whole_off_a_terminal() -> None:
    """Piped (`make demo | tee`, CI logs), rich gave the table 80 columns and cut every
    cell to an ellipsis: "BTC-USDT:LO…", "35,03…"."""
    with (data_dir() / "BTCUSDT_perp_1h_2019_2023.csv").open() as rows:
        widest = max((row for row in csv.DictReader(rows)), key=lambda row: float(row["close"]))
    products = ["BTC-USDT:LONG", "BTC-USDT:SHORT"]
    series = pipeline_demo.Series()
    for seq, product in enumerate(products, 1):
        update = nav_pb2.NavUpdated(
            event_id=f"{product}:{seq}",
            product=product,
            ts_event_ns=int(datetime.fromisoformat(widest["timestamp"]).timestamp()) * 10**9,
            nav="12345.67890123",
            target_leverage="4.95",
            actual_leverage="4.87",
            regime=common_pb2.TREND_DOWN,
            price=widest["close"],
            seq=37_805,
        )
        series.add(update, products)
    console = pipeline_demo.console
    assert not console.is_terminal
    with console.capture() as captured:
        console.print(pipeline_demo.table(series, products, 11.0))
    shown = captured.get()
    assert "…" not in shown
    assert all(product in shown for product in products)


@pytest.mark.parametrize(
    ("given", "instant"),
    [
        ("2021-04-01", "2021-04-01T00:00:00Z"),
        ("2021-04-01T12:00:00Z", "2021-04-01T12:00:00Z"),
        ("2021-04-01T00:00+02:00", "2021-03-31T22:00:00Z"),
    ],
)
def test_the_replay_is_given_the_instant_the_demo_took(given: str, instant: str) -> None:
    """The demo takes a time, but its replay got "T00:00:00Z" put after it, which
    ingestion refused once five services had started."""
    args = replay_args("BTC-USDT", given, "2021-07-01")
    flags = dict(zip(args[::2], args[1::2], strict=True))
    settings = IngestionSettings(source="replay", start=flags["--start"], end=flags["--end"])
    assert flags["--start"] == instant and settings.start == instant
