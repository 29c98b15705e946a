"""The services' acceptance test: the same real slice through the running pipeline and
through the backtester gives the same NAV series, to the minor unit.

BTC 2021-05-12..2021-05-26 (the May 2021 crash) with its funding and marks: ingestion
replay -> regime -> leverage -> hedging -> venue -> NAV, every one a subprocess in a
fresh namespace. 1,000,000 USDT goes into each smart product as a PositionOpened on
`orders.events` before the replay, and the test waits until hedging has applied them
(their NavUpdateds are out), exactly as the backtester seeds capital before the first
tick. Every NavUpdated of a tick is then compared with run_backtest's per-tick NAV
(benchmarks off, ohlc ticks), at the default StrategyConfig and at a policy file.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from smartlev.v1 import nav_pb2, venue_pb2, venue_pb2_grpc

from shared.adapters.venue_client import venue_channel
from shared.core.config import StrategyConfig
from shared.core.venue import PerpVenue
from shared.pipeline_runner import STAGES, Pipeline
from shared.settings import load_strategy
from tests.integration.pipeline import (
    CAPITAL,
    PRODUCTS,
    Slice,
    backtest_reference,
    collect,
    compare_navs,
    ns,
    require_services,
)

pytestmark = pytest.mark.integration

WINDOW = Slice("2021-05-12", "2021-05-26")


def _tick_updates(updates: list[nav_pb2.NavUpdated]) -> int:
    return sum(1 for u in updates if u.event_id == f"{u.product}:{u.seq}")


# A policy unlike the defaults at every stage: the regime's features, the leverage rules,
# the venue's fees and the products' own, so a stage that applied the defaults instead
# would show in the NAVs.
POLICY = """
[features]
vol_halflife_bars = 12.0

[regime]
min_dwell_bars = 24

[leverage]
l_max = 3.0
base_trend_aligned = 2.5
base_range = 1.5
rebalance_band = 0.3
emergency_cut = 0.7
leverage_ceiling = 3.3

[venue]
taker_fee = "0.0005"

[accounting]
open_fee = "0.002"
management_fee = "0.03"
"""


@pytest.mark.parametrize("policy", [None, POLICY], ids=["defaults", "a-policy-file"])
def test_pipeline_nav_equals_backtest_to_the_unit(
    policy: str | None, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    """And with a policy file: every stage applies the one SMARTLEV_STRATEGY_CONFIG names,
    as the backtester applies it with --config (they applied the defaults whatever was
    configured)."""
    require_services(STAGES, ingestion=True)
    env = {"SMARTLEV_STRATEGY_CONFIG": ""}
    config = StrategyConfig()
    if policy is not None:
        path = tmp_path / "policy.toml"
        path.write_text(policy)
        env["SMARTLEV_STRATEGY_CONFIG"] = str(path)
        config = load_strategy(path)
        assert config != StrategyConfig()
    reference = backtest_reference(WINDOW, config)
    n = len(reference.ticks)

    with Pipeline.start(
        STAGES, bootstrap=kafka_bootstrap, redis_url=redis_url, env=env
    ) as pipeline:
        for product in PRODUCTS:
            pipeline.deposit(product, CAPITAL, ns(WINDOW.start))
        seeded = collect(pipeline, lambda u: len(u) >= len(PRODUCTS), timeout_s=30)
        assert {u.product for u in seeded} == set(PRODUCTS)
        assert all(Decimal(u.nav) == Decimal(100) for u in seeded)

        pipeline.replay(WINDOW.replay_args())
        updates = collect(
            pipeline, lambda u: _tick_updates(u) >= 2 * n, timeout_s=120, settle_s=1.0
        )
        with venue_channel(f"127.0.0.1:{pipeline.ports['venue.grpc']}") as channel:
            account = venue_pb2_grpc.VenueStub(channel).GetAccount(
                venue_pb2.GetAccountRequest(symbol=WINDOW.symbol), timeout=10
            )

    compared = compare_navs(reference, updates)
    assert _tick_updates(updates) == 2 * n, "a tick was marked twice"
    last = reference.ticks[-1]
    books = {state.product: state for state in last.states}
    for product in PRODUCTS:
        final = [u for u in updates if u.product == product][-1]
        book = books[product]
        assert (final.units, final.position_qty) == (book.units, book.qty)
        assert Decimal(final.target_leverage) == Decimal(book.target_leverage)
    venue = reference.strategies[0].engine.venue
    assert isinstance(venue, PerpVenue)
    assert (account.wallet, account.position, account.fees_paid, account.funding_paid) == (
        str(venue.wallet),
        str(venue.position),
        str(venue.fees_paid),
        str(venue.funding_paid),
    ), "venue account differs from the backtester's"
    print(
        f"\nparity: {n} ticks, {sum(compared.values())} NAV updates compared "
        f"({', '.join(f'{p}={c}' for p, c in compared.items())}): equal to the minor unit"
    )
