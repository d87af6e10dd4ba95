#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install kvroute into it, editable, with the given extras.
# Used by the README, scripts/test.sh, .ci/run and the Dockerfile, so all install the same way.
#   VENV=.venv PYTHON=python3 scripts/install.sh [EXTRAS]     (EXTRAS default: bench)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
extras=${1:-bench}
if [[ ! -x "$venv/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
