# shellcheck shell=bash
# A fresh database and a running vitals for one client test run.
#
# Sourced by clients/*/run_tests.sh, which then call:
#   testenv_start NAME WAIT_COMMAND...
# NAME goes into the database name (vitals_client_NAME_<random>). WAIT_COMMAND
# is run with TARGET and PID appended and must exit 0 once grpc.health.v1
# Check("") answers SERVING, non-zero if the process PID died first or it
# gave up. Afterwards VITALS_TARGET (host:port) and VITALS_TEST_LOCK_LEASE_MS
# are exported; on exit the server is stopped and the database dropped.
#
# Environment:
#   DATABASE_URL  required: an admin URL whose user may CREATE DATABASE, any
#                 libpq URL form (postgres://user:pass@host:port/db,
#                 postgres://user@/db?host=/socket/dir&port=5432, ...)
#   VITALS_BIN    the server binary (default: target/debug/vitals of the checkout)

TESTENV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VITALS_BIN=${VITALS_BIN:-$TESTENV_ROOT/${CARGO_TARGET_DIR:-target}/debug/vitals}
[[ $VITALS_BIN == /* ]] || VITALS_BIN="$TESTENV_ROOT/$VITALS_BIN"
# The client tests that need a server of their own (TLS, tokens) start it.
export VITALS_BIN

# The lease the test server grants: short, so that tests can hold a lock for
# several leases (proving the keep-alives) and lose one, in a few seconds.
export VITALS_TEST_LOCK_LEASE_MS=1500

TESTENV_DIR=""
TESTENV_DB=""
TESTENV_PID=""

testenv_say() { printf '%s: %s\n' "${TESTENV_NAME:-testenv}" "$*"; }
testenv_die() {
    printf '%s: error: %s\n' "${TESTENV_NAME:-testenv}" "$*" >&2
    exit 1
}

# The admin URL with its database name replaced by $1; query and credentials kept.
testenv_db_url() {
    local re='^([A-Za-z][A-Za-z0-9+.-]*://[^/?]*)(/[^?]*)?(\?.*)?$'
    [[ $DATABASE_URL =~ $re ]] || testenv_die "DATABASE_URL is not a postgres:// URL"
    printf '%s/%s%s\n' "${BASH_REMATCH[1]}" "$1" "${BASH_REMATCH[3]}"
}

testenv_psql() { psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 "$@"; }

testenv_stop_server() {
    [[ -n $TESTENV_PID ]] || return 0
    if kill -0 "$TESTENV_PID" 2>/dev/null; then
        kill -TERM "$TESTENV_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 150; i++)); do # 15 s: the server's drain grace is 1 s
            kill -0 "$TESTENV_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$TESTENV_PID" 2>/dev/null; then
            testenv_say "vitals did not stop on SIGTERM; killing it"
            kill -KILL "$TESTENV_PID" 2>/dev/null || true
        fi
    fi
    wait "$TESTENV_PID" 2>/dev/null || true
    TESTENV_PID=""
}

testenv_cleanup() {
    local status=$?
    testenv_stop_server
    if ((status != 0)) && [[ -f $TESTENV_DIR/vitals.log ]]; then
        printf '\n--- last lines of the vitals log ---\n' >&2
        tail -n 40 "$TESTENV_DIR/vitals.log" >&2 || true
    fi
    if [[ -n $TESTENV_DB ]]; then
        testenv_psql -c "DROP DATABASE IF EXISTS \"$TESTENV_DB\" WITH (FORCE)" ||
            testenv_say "warning: could not drop database $TESTENV_DB"
    fi
    [[ -z $TESTENV_DIR ]] || rm -rf "$TESTENV_DIR"
    return "$status"
}

testenv_start() {
    local lang=$1
    shift
    TESTENV_NAME="clients/$lang/run_tests.sh"
    [[ -n ${DATABASE_URL:-} ]] || testenv_die "set DATABASE_URL to an admin URL whose user may CREATE DATABASE"
    command -v psql >/dev/null || testenv_die "psql is needed to create the test database (apt-get install postgresql-client)"
    [[ -x $VITALS_BIN ]] || testenv_die "no vitals binary at $VITALS_BIN (run cargo build, or set VITALS_BIN)"
    trap testenv_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    TESTENV_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vitals-client-test.XXXXXX")

    local db
    db="vitals_client_${lang}_$(date +%s)_$RANDOM"
    testenv_psql -c "CREATE DATABASE \"$db\"" || testenv_die "cannot CREATE DATABASE with DATABASE_URL"
    TESTENV_DB=$db
    # Tests look into pg_locks of this database to see a waiter queue up.
    export VITALS_TEST_DATABASE=$db
    local url
    url=$(testenv_db_url "$db")
    testenv_say "database $db"

    # A port probed free can still be taken before vitals binds it: retry.
    local attempt port
    for ((attempt = 1; attempt <= 5; attempt++)); do
        port=$((20000 + RANDOM % 40000))
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
        NO_COLOR=1 "$VITALS_BIN" \
            --listen-addr "127.0.0.1:$port" \
            --metrics-addr 127.0.0.1:0 \
            --database-url "$url" \
            --database-lock-idle-tx-timeout-ms "$VITALS_TEST_LOCK_LEASE_MS" \
            --shutdown-grace-ms 1000 \
            >"$TESTENV_DIR/vitals.log" 2>&1 &
        TESTENV_PID=$!
        if "$@" "127.0.0.1:$port" "$TESTENV_PID"; then
            export VITALS_TARGET="127.0.0.1:$port"
            testenv_say "vitals $VITALS_TARGET (pid $TESTENV_PID) is SERVING"
            return 0
        fi
        if kill -0 "$TESTENV_PID" 2>/dev/null || ! grep -qi 'address already in use' "$TESTENV_DIR/vitals.log"; then
            testenv_die "vitals did not become SERVING"
        fi
        wait "$TESTENV_PID" 2>/dev/null || true
        TESTENV_PID=""
    done
    testenv_die "could not start vitals on a free port"
}
