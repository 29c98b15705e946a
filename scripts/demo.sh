#!/usr/bin/env bash
# Demo: start the stack, replay real BTC ticks through Kafka and check they come back exact.
#   scripts/demo.sh [-n 500] [--symbol BTC-USDT]     (SMARTLEV_DATA_DIR overrides ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "no .venv: run 'make setup' first" >&2; exit 1; }
[ -f gen/.generated ] || [ -d gen/smartlev ] || bash scripts/gen_proto.sh
if [ -f scripts/stack.sh ]; then
  bash scripts/stack.sh up
else
  echo "scripts/stack.sh not found: using a broker already on \${SMARTLEV_SERVICE_KAFKA__BOOTSTRAP:-127.0.0.1:9092}" >&2
fi
.venv/bin/python -m shared.adapters.kafka_admin
exec .venv/bin/python -m shared.demo_roundtrip "$@"
