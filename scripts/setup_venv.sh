#!/usr/bin/env bash
# Creates .venv with the exact pinned packages and installs the project in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"' \
  || { echo "smartlev needs Python 3.11 or newer (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
echo "==> installing pinned packages (requirements.lock)"
.venv/bin/python -m pip install -q --upgrade pip
# one line per package, not -q: the first setup downloads for minutes
.venv/bin/python -m pip install --progress-bar off -r requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
# Generated protobuf code lives in gen/ (package smartlev.v1); put it on the venv's path.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/gen" > "$site/smartlev-generated.pth"
echo "==> venv ready"
