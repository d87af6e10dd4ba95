#!/usr/bin/env bash
# Regenerate the committed Python stubs of protos/kvroute/v1/*.proto into kvroute/v1/.
# Usage: scripts/gen_protos.sh [--check]   (--check: fail when the committed stubs are stale)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=kvroute/v1
if [[ "${1:-}" == "--check" ]]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/kvroute/v1"
  "$python" -m grpc_tools.protoc -I protos --python_out="$tmp" --grpc_python_out="$tmp" \
    --mypy_out="$tmp" --mypy_grpc_out="$tmp" protos/kvroute/v1/*.proto
  if ! diff -r -x __init__.py -x __pycache__ "$tmp/kvroute/v1" "$out"; then
    echo "generated protobuf stubs are stale: run scripts/gen_protos.sh and commit kvroute/v1/" >&2
    exit 1
  fi
  echo "protobuf stubs are up to date"
  exit 0
fi
find "$out" -name '*_pb2*.py*' -delete 2>/dev/null || true
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. \
  --mypy_out=. --mypy_grpc_out=. protos/kvroute/v1/*.proto
echo "regenerated $(ls "$out" | grep -c _pb2) files in $out"
