#!/usr/bin/env bash
# `make chaos`: fault injection on the real stack (docs/reliability.md).
#   1. bad input on every topic and fuzzed gRPC calls (pytest, counts printed);
#   2. the kill/restart run: CHAOS_CYCLES (default 21) kill -9 + restart cycles over every
#      service at CHAOS_SEED-chosen moments of a paced replay with gateway orders, compared
#      tick by tick with an uninterrupted run, then reconcile.
# CHAOS_INFRA=1 also restarts the shared Kafka broker and redis-server mid-run: only when
# nobody else is using the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${CHAOS_SEED:-$RANDOM}
cycles=${CHAOS_CYCLES:-21}
infra=()
[ "${CHAOS_INFRA:-}" = "1" ] && infra=(--infra)

# Every run starts its own namespaced services; the stack provides Kafka and Redis.
bash scripts/stack.sh up
echo "==> bad input on every topic -> .dlq; every gRPC method fuzzed"
fuzz=0
SMARTLEV_FUZZ_EXAMPLES=${CHAOS_FUZZ_EXAMPLES:-100} .venv/bin/pytest -q -s -rxX \
  tests/integration/test_dlq_fuzz.py tests/integration/test_grpc_fuzz.py || fuzz=$?
echo "==> kill/restart: seed $seed, $cycles cycles (rerun: CHAOS_SEED=$seed make chaos)"
.venv/bin/python -m tests.chaos --seed "$seed" --cycles "$cycles" "${infra[@]}"
[ "$fuzz" -eq 0 ] || { echo "FAILED: the fuzz tests (exit $fuzz, above)" >&2; exit 1; }
