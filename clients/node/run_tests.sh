#!/usr/bin/env bash
# Tests the Node client against a real vitals.
#
# Usage: clients/node/run_tests.sh [NODE_TEST_ARGS...]
#
# 1. Installs the locked dependencies (package-lock.json) into
#    clients/node/node_modules (git-ignored) with npm ci, nothing global;
#    again only when package-lock.json changes.
# 2. Creates a fresh database from $DATABASE_URL, starts $VITALS_BIN on a free
#    port and waits for SERVING (clients/testenv.sh), runs `node --test`, then
#    stops the server and drops the database, whatever happened.
#
# The client loads proto/ at run time: there is no code generation step.
# Environment: DATABASE_URL (required, an admin URL), VITALS_BIN (default
# target/debug/vitals).

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE"
# shellcheck source=SCRIPTDIR/../testenv.sh
source "$HERE/../testenv.sh"

command -v node >/dev/null || testenv_die "node (20 or newer) is needed"
major=$(node -p 'process.versions.node.split(".")[0]')
((major >= 20)) || testenv_die "node 20 or newer is needed, found $(node --version)"

STAMP=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ $(cat "$STAMP" 2>/dev/null) != "$want" ]]; then
    echo "==> npm ci"
    # --ignore-scripts: no dependency needs an install script (protobufjs'
    # only checks its version).
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    printf '%s\n' "$want" >"$STAMP"
fi

testenv_start node node test/support/wait_serving.js

echo "==> node --test"
# --test-timeout: a hung stream fails its test instead of the whole run.
node --test --test-reporter=spec --test-timeout=60000 "$@" test/*.test.js
