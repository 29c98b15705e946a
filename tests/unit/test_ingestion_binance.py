"""The Binance USDT-M parser and fold against recorded-format exchange messages.

The payloads below are RECORDED-FORMAT SAMPLES: written in the exact shape Binance's
USDT-M futures websocket streams send (`<symbol>@aggTrade`, `<symbol>@markPrice@1s`,
and the combined-stream wrapper), with realistic values; not captured from a live
session (no network here).
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from services.ingestion.binance import (
    MARK_MAX_AGE_NS,
    MAX_AHEAD_NS,
    BinanceFeed,
    FeedError,
    MarkObserved,
    TradeObserved,
    ccxt_symbol,
    parse,
)
from services.ingestion.validation import EMPTY, Accepted, Policy, admit
from shared.core.market import FundingRate, Tick

MS = 1_000_000
RECEIVED = 1717200005000 * MS  # this machine's clock: after every sample's times
AGG_TRADE = """{"e":"aggTrade","E":1717200000123,"a":2155403291,"s":"BTCUSDT","p":"67512.30",
"q":"0.015","f":5070362144,"l":5070362146,"T":1717200000120,"m":true}"""
MARK_UPDATE = """{"e":"markPriceUpdate","E":1717199999000,"s":"BTCUSDT","p":"67508.61428571",
"P":"67534.92160305","i":"67546.83404762","r":"0.00010000","T":1717200000000}"""
MARK_NEXT = """{"e":"markPriceUpdate","E":1717200001000,"s":"BTCUSDT","p":"67515.10000000",
"P":"67530.01000000","i":"67549.20000000","r":"0.00007431","T":1717228800000}"""
COMBINED = """{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1717200002001,
"a":2155403300,"s":"BTCUSDT","p":"67520.00","q":"1.204","f":5070362150,"l":5070362160,
"T":1717200002000,"m":false}}"""


def test_agg_trade_is_an_exact_trade_at_trade_time() -> None:
    assert parse(AGG_TRADE, "BTC-USDT") == TradeObserved(
        1717200000120 * MS, Decimal("67512.30"), 2155403291
    )
    assert parse(COMBINED.encode(), "BTC-USDT") == TradeObserved(
        1717200002000 * MS, Decimal("67520.00"), 2155403300
    )


def test_a_trade_delivered_again_is_refused_not_published_twice() -> None:
    """The latest trade again, in its own millisecond, got the next nanosecond (as a
    second trade of that millisecond would) and a seq of its own: two ticks of one
    trade. Its id says it is the same one."""
    feed, [tick] = BinanceFeed("BTC-USDT").on_message(AGG_TRADE, RECEIVED)
    with pytest.raises(FeedError, match="trade 2155403291 is not after the last one taken"):
        feed.on_message(AGG_TRADE, RECEIVED)
    same_ms = json.loads(AGG_TRADE) | {"a": 2155403292, "p": "67512.40"}  # a real second one
    feed, [second] = feed.on_message(same_ms, RECEIVED)
    assert (second.ts_ns, second.price) == (tick.ts_ns + 1, Decimal("67512.40"))


def test_mark_price_update() -> None:
    assert parse(json.loads(MARK_UPDATE), "BTC-USDT") == MarkObserved(
        1717199999000 * MS, Decimal("67508.61428571"), Decimal("0.00010000"), 1717200000000 * MS
    )


def test_fold_carries_the_mark_and_settles_funding_before_the_next_tick() -> None:
    feed = BinanceFeed("BTC-USDT")
    feed, out = feed.on_message(MARK_UPDATE, RECEIVED)
    assert out == []
    # The trade at T+120ms passed the settlement at T: funding first, then the tick.
    feed, out = feed.on_message(AGG_TRADE, RECEIVED)
    mark = Decimal("67508.61428571")
    assert out == [
        FundingRate("BTC-USDT", 1717200000000 * MS, Decimal("0.00010000")),
        Tick("BTC-USDT", 1717200000120 * MS, Decimal("67512.30"), mark),
    ]
    # The next mark update announces the next T; nothing settles twice.
    feed, out = feed.on_message(MARK_NEXT, RECEIVED)
    assert out == []
    feed, out = feed.on_message(COMBINED, RECEIVED)
    assert out == [Tick("BTC-USDT", 1717200002000 * MS, Decimal("67520.00"), Decimal("67515.1"))]


def test_trades_of_one_millisecond_all_pass_the_validator_in_order() -> None:
    """One taker order sweeping three price levels: three aggTrades stamped the same ms.
    Each later one is a nanosecond later, so time still moves forward; the next ms is
    its own time again."""
    sweep = [
        {**json.loads(AGG_TRADE), "a": 2155403291 + i, "p": price}
        for i, price in enumerate(("67512.30", "67512.40", "67512.90"))
    ]
    later = {**json.loads(AGG_TRADE), "a": 2155403294, "T": 1717200000121, "p": "67513.00"}
    feed = BinanceFeed("BTC-USDT")
    ticks = []
    for message in [*sweep, later]:
        feed, out = feed.on_message(message, RECEIVED)
        ticks.extend(out)
    t = 1717200000120 * MS
    assert [(tick.ts_ns, tick.price) for tick in ticks] == [
        (t, Decimal("67512.30")),
        (t + 1, Decimal("67512.40")),
        (t + 2, Decimal("67512.90")),
        (t + MS, Decimal("67513.00")),
    ]
    state = EMPTY
    for tick in ticks:
        state, verdict = admit(state, tick, Policy())
        assert isinstance(verdict, Accepted), verdict


def test_a_later_funding_time_settles_the_pending_one_without_a_trade() -> None:
    feed, _ = BinanceFeed("BTC-USDT").on_message(MARK_UPDATE, RECEIVED)
    feed, out = feed.on_message(MARK_NEXT, RECEIVED)
    assert out == [FundingRate("BTC-USDT", 1717200000000 * MS, Decimal("0.00010000"))]
    assert feed.pending_at_ns == 1717228800000 * MS
    assert feed.pending_rate == Decimal("0.00007431")


def test_a_moved_schedule_drops_a_funding_whose_time_has_not_come() -> None:
    """Announced for 00:00, moved to 08:00 at 23:00 the day before: nothing settled at
    00:00. Published, that funding would be stamped an hour ahead of every trade until
    then, and each of them refused as not moving forward."""
    feed, _ = BinanceFeed("BTC-USDT").on_message(MARK_UPDATE, RECEIVED)
    an_hour_before = 1717200000000 * MS - 3600 * 10**9
    moved, out = feed.on_message(_with(MARK_NEXT, E=an_hour_before // MS), an_hour_before)
    assert out == []
    assert (moved.pending_at_ns, moved.pending_rate) == (1717228800000 * MS, Decimal("0.00007431"))
    # at the drift allowed past it, it had settled
    drift_before = 1717200000000 * MS - MAX_AHEAD_NS
    _, out = feed.on_message(_with(MARK_NEXT, E=drift_before // MS), drift_before)
    assert [f.ts_ns for f in out if isinstance(f, FundingRate)] == [1717200000000 * MS]


def _with(payload: str, **changes: object) -> dict[str, object]:
    data = json.loads(payload)
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (_with(AGG_TRADE, e="depthUpdate"), "unsupported event type"),
        (_with(AGG_TRADE, s="ETHUSDT"), "is not 'BTCUSDT'"),
        (_with(AGG_TRADE, p=67512.3), "must be a decimal string"),
        (_with(AGG_TRADE, p="NaN"), "not finite"),
        (_with(AGG_TRADE, p="abc"), "not a number"),
        (_with(AGG_TRADE, T=None), "positive integer of ms"),
        (_with(AGG_TRADE, T=-1), "positive integer of ms"),
        ({k: v for k, v in json.loads(AGG_TRADE).items() if k != "p"}, "missing field 'p'"),
        (_with(MARK_UPDATE, p="Infinity"), "not finite"),
        (_with(MARK_UPDATE, E="1717199999000"), "positive integer of ms"),
        (_with(MARK_UPDATE, p="0"), r"mark price\) must be > 0, got 0"),
        (_with(MARK_UPDATE, p="-1.5"), r"mark price\) must be > 0, got -1.5"),
        # kept, each would have every trade after it refused (the mark goes with them)
        (_with(MARK_UPDATE, p="42000.1000000000001"), "decimal places"),
        (_with(MARK_UPDATE, p="1" + "0" * 15), r"mark price\)"),
        (_with(MARK_UPDATE, E=1717200005000 + 120_000), "mark time is 120 s ahead"),
    ],
)
def test_malformed_messages_raise_with_the_reason(message: object, reason: str) -> None:
    with pytest.raises(FeedError, match=reason):
        BinanceFeed("BTC-USDT").on_message(message, RECEIVED)


def test_a_trade_stamped_past_the_clocks_drift_is_refused() -> None:
    """Published, a trade from the future would leave every real one after it refused as
    not moving forward, for good."""
    stamped = 1717200000120 * MS
    feed = BinanceFeed("BTC-USDT")
    with pytest.raises(FeedError, match="61 s ahead of the clock"):
        feed.on_message(AGG_TRADE, stamped - MAX_AHEAD_NS - 1_000_000_000)
    _, out = feed.on_message(AGG_TRADE, stamped - MAX_AHEAD_NS)  # at the drift allowed
    assert [e.ts_ns for e in out] == [stamped]


def test_a_late_trade_does_not_take_the_feeds_time_back() -> None:
    """A trade a millisecond late (the validator refuses it) set the feed's last trade
    time back: the next trades of the millisecond before were stamped again as the ones
    already published, and refused as not moving forward."""
    feed = BinanceFeed("BTC-USDT")
    stamped: list[int] = []
    for n, ms in enumerate((120, 120, 119, 120, 120, 121)):
        trade = _with(AGG_TRADE, T=1717200000000 + ms, a=2155403291 + n)
        feed, out = feed.on_message(trade, RECEIVED)
        stamped += [e.ts_ns for e in out if isinstance(e, Tick)]
    first = 1717200000120 * MS
    # the late one keeps its own stamp (the validator refuses it); the others go forward
    assert stamped == [first, first + 1, first - MS, first + 2, first + 3, first + MS]


def test_zero_and_negative_prices_parse_and_are_left_to_the_validator() -> None:
    _, out = BinanceFeed("BTC-USDT").on_message(_with(AGG_TRADE, p="0"), RECEIVED)
    assert out == [Tick("BTC-USDT", 1717200000120 * MS, Decimal("0"), None)]


def test_ccxt_symbol() -> None:
    assert ccxt_symbol("BTC-USDT") == "BTC/USDT:USDT"
    with pytest.raises(ValueError):
        ccxt_symbol("BTCUSDT")


def test_a_mark_from_before_an_outage_is_left_off_the_trades_after_it() -> None:
    """The fold's mark is kept across a restart; after an outage of hours the first
    trades carried the mark from before it, and the risk rules judged them by it."""
    marked, _ = BinanceFeed("BTC-USDT").on_message(MARK_UPDATE, RECEIVED)
    restarted = BinanceFeed.from_fields("BTC-USDT", marked.fields())
    assert restarted == marked
    hours_later = {**json.loads(AGG_TRADE), "T": 1717200000120 + 2 * 3600 * 1000}
    _, out = restarted.on_message(hours_later, RECEIVED + 2 * 3600 * 10**9)
    [tick] = [e for e in out if isinstance(e, Tick)]
    assert tick.mark_price is None
    # within MARK_MAX_AGE_NS it goes with the trade; a kept mark of unknown age does not
    edge = {**json.loads(AGG_TRADE), "T": 1717199999000 + MARK_MAX_AGE_NS // MS}
    assert restarted.on_message(edge, RECEIVED)[1][-1].mark_price == marked.mark
    older_build = {k: v for k, v in marked.fields().items() if k != "mark_ns"}
    unknown = BinanceFeed.from_fields("BTC-USDT", older_build)
    assert unknown.on_message(AGG_TRADE, RECEIVED)[1][-1].mark_price is None
