"""PNG charts of what people would rather see than read: price, NAV, leverage, regime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt

REGIME_COLOURS = {
    "TREND_UP": "#c8e6c9",
    "TREND_DOWN": "#ffcdd2",
    "RANGE": "#eeeeee",
    "HIGH_VOL": "#ffe0b2",
}


def _dates(times: Sequence[int]) -> list[datetime]:
    return [datetime.fromtimestamp(t / 1e9, tz=UTC) for t in times]


def _shade_regimes(axis: plt.Axes, dates: Sequence[datetime], regimes: Sequence[str]) -> None:
    start = 0
    for i in range(1, len(regimes) + 1):
        if i == len(regimes) or regimes[i] != regimes[start]:
            axis.axvspan(
                mdates.date2num(dates[start]),
                mdates.date2num(dates[i - 1]),
                color=REGIME_COLOURS.get(regimes[start], "white"),
                lw=0,
            )
            start = i


def nav_chart(
    path: Path,
    title: str,
    times: Sequence[int],
    prices: Sequence[Decimal],
    regimes: Sequence[str],
    navs: Mapping[str, Sequence[Decimal]],
    leverages: Mapping[str, Sequence[float]],
    targets: Mapping[str, Sequence[float]],
    highlight: Sequence[str] = (),
) -> None:
    """Three panels on one time axis: price with regimes, NAVs (log), leverage."""
    dates = _dates(times)
    figure, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(13, 10), sharex=True, gridspec_kw={"height_ratios": [2, 3, 2]}
    )
    _shade_regimes(top, dates, regimes)
    top.plot(dates, [float(p) for p in prices], color="black", lw=0.8)
    top.set_yscale("log")
    top.set_ylabel("price (log)")
    top.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in REGIME_COLOURS.values()]
    top.legend(handles, list(REGIME_COLOURS), loc="upper left", fontsize=8, ncol=4)
    for product, series in navs.items():
        bold = product in highlight
        middle.plot(
            dates,
            [max(float(n), 1e-6) for n in series],
            label=product,
            lw=1.6 if bold else 0.8,
            alpha=1.0 if bold else 0.7,
        )
    middle.set_yscale("log")
    middle.set_ylabel("NAV (log)")
    middle.legend(loc="upper left", fontsize=7, ncol=2)
    for product in leverages:
        line = bottom.plot(dates, leverages[product], lw=0.7, label=f"{product} actual")
        bottom.plot(
            dates,
            targets[product],
            lw=0.7,
            ls="--",
            color=line[0].get_color(),
            label=f"{product} target",
        )
    bottom.set_ylabel("leverage (x)")
    bottom.legend(loc="upper left", fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
