#!/usr/bin/env bash
# Compiles proto/ into gen/ (Python messages, gRPC stubs and type stubs). Never edit gen/ by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gen && mkdir -p gen
mapfile -t protos < <(find proto -name '*.proto' | sort)
[ ${#protos[@]} -gt 0 ] || { echo "no .proto files under proto/" >&2; exit 1; }
.venv/bin/python -m grpc_tools.protoc -Iproto --python_out=gen --grpc_python_out=gen --pyi_out=gen "${protos[@]}"
find gen -type d -exec touch {}/__init__.py \;
rm -f gen/__init__.py
echo "==> generated ${#protos[@]} proto files into gen/"
