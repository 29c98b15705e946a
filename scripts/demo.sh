#!/usr/bin/env bash
# `make demo`: start the real stack, replay real BTC history through the running services
# (ingestion -> regime -> leverage -> hedging -> venue -> NAV) with a live NAV table and a
# chart, then run the backtester over BTC 2019-2023 beside fixed-leverage tokens and chart it.
#   bash scripts/demo.sh            (SMARTLEV_DATA_DIR overrides ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${SMARTLEV_DATA_DIR:-../shared/data}
[ -d "$data" ] || { echo "market data not found at $data (set SMARTLEV_DATA_DIR)" >&2; exit 1; }

echo "==> 1/3 stack: Kafka + Redis (+ topics)"
bash scripts/stack.sh up

echo "==> 2/3 the services: BTC 2021-04-01..2021-07-01 replayed through the pipeline, live"
.venv/bin/python -m shared.pipeline_demo --start 2021-04-01 --end 2021-07-01 --out out/demo

echo "==> 3/3 backtest: smart long/short vs 1x/2x/3x daily-rebalanced tokens, BTC 2019-2023"
.venv/bin/smartlev backtest \
  --data "$data/BTCUSDT_perp_1h_2019_2023.csv" \
  --funding "$data/BTCUSDT_funding_8h_2019_2023.csv" \
  --marks "$data/BTCUSDT_mark_1h_2019_2023.csv" \
  --symbol BTC-USDT --out out/demo
echo "==> chart: out/demo/chart.png   metrics: out/demo/metrics.json   series: out/demo/nav.csv"
