#!/usr/bin/env bash
# Benchmarks: each prints a table with its baseline measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The service benchmarks need the broker and Redis; the stack's own services idle meanwhile.
bash scripts/stack.sh up
echo "==> core: features -> regime -> leverage -> hedging -> NAV (pure, no I/O)"
.venv/bin/python -m tests.bench.bench_core "$@"
echo "==> pipeline: ingestion -> regime -> leverage -> hedging -> venue -> NAV (running services)"
.venv/bin/python -m tests.bench.bench_pipeline
echo "==> gateway: open+close orders over gRPC with 1, 8, 64 clients, beside a no-op call"
.venv/bin/python -m tests.bench.bench_gateway
