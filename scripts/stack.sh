#!/usr/bin/env bash
# The local stack: Kafka (KRaft) on 127.0.0.1:9092, Redis (AOF) on 127.0.0.1:6379 and the
# Python services declared in scripts/stack.toml, all as background processes owned by this
# checkout (pids, logs and data under .run/).
#
#   bash scripts/stack.sh up | down | ps | logs [NAME...] [-n N] [--no-follow]
#   bash scripts/stack.sh restart NAME | stop NAME | restart-kafka | restart-redis | init
#   bash scripts/stack.sh check NAME      (one component's health check; exit 1 if unhealthy)
#
# The work is done by scripts/stack.py (process management needs more than bash does well);
# it runs on the project's venv because the Kafka health check uses kafka-python.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -eq 0 ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
if [ ! -x .venv/bin/python ] && [ "$1" = down ]; then
  # stopping needs only the standard library: `make clean` on a fresh clone, twice, or
  # with the venv gone under a running stack
  exec python3 scripts/stack.py down
fi
if [ ! -x .venv/bin/python ]; then
  echo "stack.sh: error: no .venv yet; run \`make setup\` first" >&2
  exit 1
fi
exec .venv/bin/python scripts/stack.py "$@"
