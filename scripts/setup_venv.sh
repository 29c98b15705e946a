#!/usr/bin/env bash
# Creates .venv with the exact pinned packages and installs the project in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"' \
  || { echo "smartlev needs Python 3.11 or newer (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }
# A venv whose creation stopped half way (no ensurepip: Debian's python3.X-venv missing;
# an interrupt) has a python but no pip: made anew, not trusted.
if [ -e .venv ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "==> .venv is incomplete (no working pip): creating it anew"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PYTHON" --version)"
  if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    # Debian splits venv's pip bootstrap into python3.X-venv
    pkg="python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "==> installing $pkg (apt-get; first run only)"
      apt-get install -y -q "$pkg" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "$pkg" >/dev/null; }
    else
      echo "$PYTHON cannot create a venv with pip: install $pkg (sudo apt-get install $pkg)" >&2
      exit 1
    fi
  fi
  "$PYTHON" -m venv .venv || { rm -rf .venv; echo "creating .venv failed" >&2; exit 1; }
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
