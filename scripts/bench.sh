#!/usr/bin/env bash
# Benchmarks: each prints a table with its baseline measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The core is pure: measured before the stack starts, so a starting broker and services
# do not share its core (a run right after `stack.sh up` measured 0.75 s against 0.47).
echo "==> core: features -> regime -> leverage -> hedging -> NAV (pure, no I/O)"
.venv/bin/python -m tests.bench.bench_core "$@"
# The service benchmarks need the broker and Redis; the stack's own services idle meanwhile.
bash scripts/stack.sh up
echo "==> pipeline: ingestion -> regime -> leverage -> hedging -> venue -> NAV (running services)"
.venv/bin/python -m tests.bench.bench_pipeline
echo "==> gateway: open+close orders over gRPC with 1, 8, 64 clients, beside a no-op call"
.venv/bin/python -m tests.bench.bench_gateway
