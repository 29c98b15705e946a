#!/usr/bin/env bash
# grpcurl, installed on first use into .cache/bin with the machine's Go (module proxy).
# Usage: bash scripts/grpcurl.sh [grpcurl flags...], e.g.
#   bash scripts/grpcurl.sh -plaintext -H 'authorization: Bearer dev-alice-key' 127.0.0.1:50051 list
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="${GRPCURL_VERSION:-v1.9.1}"
BIN="$ROOT/.cache/bin/grpcurl"
if [[ ! -x "$BIN" ]]; then
  if ! command -v go >/dev/null 2>&1; then
    echo "scripts/grpcurl.sh: grpcurl is not installed and Go is missing; install Go 1.21+" \
      "(https://go.dev/dl) or put a grpcurl binary at $BIN" >&2
    exit 127
  fi
  echo "scripts/grpcurl.sh: installing grpcurl $VERSION into .cache/bin (once)" >&2
  mkdir -p "$ROOT/.cache/bin"
  GOBIN="$ROOT/.cache/bin" go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$VERSION" >&2
fi
exec "$BIN" "$@"
