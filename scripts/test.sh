#!/usr/bin/env bash
# The test command: install kvroute with its test extras into $VENV (default .venv) and run the
# whole suite (unit, integration with a real etcd and real gRPC servers, peers).
# Extra arguments go to pytest. "No tests ran" (pytest exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
VENV=$venv scripts/install.sh "test,bench,peers"
set +e
"$venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit $rc
