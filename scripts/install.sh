#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install kvroute into it, editable, with the given extras.
# Used by the README, scripts/test.sh, .ci/run and the Dockerfile, so all install the same way.
#   VENV=.venv PYTHON=python3 scripts/install.sh [EXTRAS]     (EXTRAS default: bench)
# EDITABLE=0 installs a regular (non-editable) copy, as the container image does; EXTRAS may be
# empty ("") for the runtime dependencies only.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
extras=${1-bench}
target=.${extras:+[$extras]}
editable=-e
[[ ${EDITABLE:-1} == 0 ]] && editable=
if [[ ! -x "$venv/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check $editable "$target"
