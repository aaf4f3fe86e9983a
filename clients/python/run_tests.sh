#!/usr/bin/env bash
# Tests the Python client against a real vitals.
#
# Usage: clients/python/run_tests.sh [PYTEST_ARGS...]
#
# 1. Creates clients/python/.venv (git-ignored) with the pinned
#    requirements.txt, nothing global; reinstalls only when that file changes.
# 2. Builds and installs vitals_client into it: setup.py generates the gRPC
#    code from proto/ into src/vitals_client/_gen (git-ignored).
# 3. Creates a fresh database from $DATABASE_URL, starts $VITALS_BIN on a free
#    port and waits for SERVING (clients/testenv.sh), runs pytest, then stops
#    the server and drops the database, whatever happened.
#
# Environment: DATABASE_URL (required, an admin URL), VITALS_BIN (default
# target/debug/vitals), PYTHON (the interpreter for the venv, default python3).

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE"
# shellcheck source=SCRIPTDIR/../testenv.sh
source "$HERE/../testenv.sh"

VENV=$HERE/.venv
STAMP=$VENV/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ ! -x $VENV/bin/python || $(cat "$STAMP" 2>/dev/null) != "$want" ]]; then
    echo "==> creating $VENV from requirements.txt"
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV" ||
        testenv_die "${PYTHON:-python3} -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r requirements.txt
    printf '%s\n' "$want" >"$STAMP"
fi

echo "==> building vitals_client (generating the gRPC code from proto/)"
# --no-build-isolation: build with the pinned setuptools and grpcio-tools
# already in the venv instead of fetching the build requirements again.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --no-deps --no-build-isolation --force-reinstall .

testenv_start python "$VENV/bin/python" tests/wait_serving.py

echo "==> pytest"
"$VENV/bin/python" -m pytest "$@"
