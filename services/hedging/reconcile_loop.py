"""The books check (shared/reconcile.py, check 1) on a timer inside the hedging service:
`smartlev_books_balanced{symbol}` and `smartlev_books_difference{symbol}` on /metrics.

It only reads Redis (hedging's state and the venue's account), never the event path, so
a slow or failing check cannot hold up an event.
"""

from __future__ import annotations

from shared.consumer_stage import ConsumerRuntime
from shared.core.config import StrategyConfig
from shared.logging import get_logger
from shared.reconcile import BOOKS_CHECK_FAILED, BooksMonitor
from shared.settings import ServiceSettings

log = get_logger("hedging", "reconcile")


def install_reconcile_loop(
    runtime: ConsumerRuntime,
    settings: ServiceSettings,
    config: StrategyConfig,
    interval_s: float = 30.0,
) -> BooksMonitor:
    """Check every configured symbol's books every `interval_s` (runtime.redis set)."""
    monitor = BooksMonitor(runtime.redis, config, settings.namespace, list(config.instruments))

    async def reconcile_books() -> None:
        found = await monitor.check()
        for symbol, rows in found.items():
            for row in rows:
                if row.check == BOOKS_CHECK_FAILED:  # Redis down, a state it cannot read
                    log.warning("reconcile_unavailable", symbol=symbol, error=str(row.actual))
                    continue
                log.error(
                    "books_out_of_balance",
                    symbol=symbol,
                    check=row.check,
                    expected=str(row.expected),
                    actual=str(row.actual),
                )

    runtime.every("reconcile-books", interval_s, reconcile_books)
    return monitor
