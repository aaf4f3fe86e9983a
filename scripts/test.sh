#!/usr/bin/env bash
# The one command that runs every test.
#
# Usage: scripts/test.sh [ARGS...]
#   With no ARGS: cargo test --all-targets, then the doc tests.
#   With ARGS:    cargo test --locked ARGS (e.g. a test-name filter, or
#                 `--test integration -- --nocapture`).
#
# Steps, always in this order, stopping at the first failure:
#   fmt      cargo fmt --all -- --check
#   clippy   cargo clippy -D warnings (vitals and the vitals-bench load generator), cargo doc -D warnings
#   buf      buf lint, then buf breaking against the protos as they were
#            before their newest change (see step_buf_breaking)
#   test     cargo test --locked                               (needs the database,
#            and promtool: as root, installed when missing)
#   clients  clients/python/run_tests.sh, clients/node/run_tests.sh, when they
#            exist, with DATABASE_URL and VITALS_BIN set        (needs the database)
#   walkthrough  scripts/walkthrough.sh: every grpcurl / buf curl command of
#            README.md's walkthrough against a live vitals, outputs compared
#            with the README; every RPC listed and called through reflection
#            (grpcurl v1alpha, buf curl v1)                     (needs the database)
#   db       debugging: start the database, print DATABASE_URL and
#            max_connections, stop it                          (needs the database)
#
# Environment:
#   VITALS_TEST_STEPS     the steps to run (default: "fmt clippy buf test clients walkthrough")
#   DATABASE_URL          an admin URL whose user may CREATE DATABASE; each test
#                         creates its own database from it. Unset: a throw-away
#                         PostgreSQL cluster is started and removed on exit.
#   VITALS_TEST_PG        how that cluster is started: auto (default; pg_virtualenv
#                         when there, else initdb/pg_ctl), virtualenv or direct
#   BUF_BREAKING_AGAINST  a git revision to compare the protos with instead of the
#                         default; "none" skips buf breaking
#   CARGO_TARGET_DIR      honoured; the build cache is never cleaned
#
# buf is installed from npm (@bufbuild/buf, pinned below) into .tools/, never
# globally, and only when that version is missing.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SCRIPT="$ROOT/scripts/test.sh"

BUF_VERSION=1.75.0
TOOLS_DIR="$ROOT/.tools"
BUF="$TOOLS_DIR/node_modules/.bin/buf"

# Integration tests create a database per test and run in parallel.
PG_SETTINGS=(max_connections=300 max_locks_per_transaction=256 fsync=off synchronous_commit=off full_page_writes=off)
PG_MIN_CONNECTIONS=200

ALL_STEPS="fmt clippy buf test clients walkthrough db"
read -r -a STEPS <<<"${VITALS_TEST_STEPS:-fmt clippy buf test clients walkthrough}"

say() { printf 'test.sh: %s\n' "$*"; }
die() {
    printf 'test.sh: error: %s\n' "$*" >&2
    exit 1
}
header() { printf '\n==> %s\n' "$*"; }
# Prints the command as the step's header, then runs it.
run() {
    header "$*"
    "$@"
}

has_step() {
    local s
    for s in "${STEPS[@]}"; do
        [[ $s == "$1" ]] && return 0
    done
    return 1
}

for s in "${STEPS[@]}"; do
    [[ " $ALL_STEPS " == *" $s "* ]] || die "unknown step '$s' in VITALS_TEST_STEPS (known: $ALL_STEPS)"
done

# Scratch space for this run; the throw-away cluster of the direct mode is
# stopped and removed here too.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vitals-test.XXXXXX")
PG_DIRECT_DIR=""
AS_PG=()
cleanup() {
    if [[ -n $PG_DIRECT_DIR ]]; then
        say "stopping the throw-away PostgreSQL cluster"
        "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$PG_DIRECT_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIRECT_DIR"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

target_dir() {
    local dir=${CARGO_TARGET_DIR:-target}
    [[ $dir == /* ]] || dir="$ROOT/$dir"
    printf '%s\n' "$dir"
}

# ---------------------------------------------------------------- rust lints

step_fmt() { run cargo fmt --all -- --check; }

step_clippy() {
    run cargo clippy --all-targets --locked -- -D warnings
    # The load generator is a workspace member that a plain build skips.
    run cargo clippy --all-targets --locked -p vitals-bench -- -D warnings
    # Broken intra-doc links are how module docs drift from the code.
    RUSTDOCFLAGS="-D warnings" run cargo doc --no-deps --locked
}

# ---------------------------------------------------------------------- buf

ensure_buf() {
    if [[ -x $BUF ]] && [[ $("$BUF" --version 2>/dev/null) == "$BUF_VERSION" ]]; then
        return 0
    fi
    command -v npm >/dev/null || die "npm is needed to install buf (Debian/Ubuntu: apt-get install nodejs npm)"
    # --ignore-scripts: the postinstall only swaps the JS launcher for the
    # native binary; the launcher finds the platform package without it.
    run npm install --prefix "$TOOLS_DIR" --no-save --no-package-lock --no-audit --no-fund \
        --ignore-scripts --loglevel=error "@bufbuild/buf@$BUF_VERSION"
    [[ $("$BUF" --version) == "$BUF_VERSION" ]] || die "installed buf does not report version $BUF_VERSION"
}

skip_breaking() { say "buf breaking skipped: $*"; }

# Runs buf breaking with proto/ of the working tree against proto/ of a commit.
# The old tree is exported with git archive rather than read through buf's
# .git#ref= input: that works the same in any clone and needs no git transport.
breaking_against() {
    local base=$1 old f
    old=$(mktemp -d "$WORK/buf-against.XXXXXX")
    git archive "$base" proto | tar -x -C "$old"
    for f in buf.yaml buf.lock; do
        if git cat-file -e "$base:$f" 2>/dev/null; then
            git show "$base:$f" >"$old/$f"
        fi
    done
    [[ -f $old/buf.yaml ]] || cp buf.yaml "$old/buf.yaml"
    say "comparing proto/ with $(git log -1 --format='%h "%s"' "$base")"
    "$BUF" breaking --against "$old"
}

# By default proto/ (working tree) is compared with:
#   - proto/ as it was just before the newest commit that changed it, so a
#     breaking change stays visible to every later run until proto/ changes
#     again, even after commits that do not touch proto/ land on top of it. A
#     commit whose message has the line "Proto-Breaking: allowed" waives this
#     comparison until the next commit that changes proto/;
#   - and, when proto/ has uncommitted changes, HEAD as well.
# BUF_BREAKING_AGAINST=REV compares with REV alone; =none skips.
step_buf_breaking() {
    header "buf breaking"
    local against=${BUF_BREAKING_AGAINST:-} last base
    if [[ $against == none ]]; then
        skip_breaking "BUF_BREAKING_AGAINST=none"
        return 0
    fi
    if [[ -n $against ]]; then
        base=$(git rev-parse --verify -q "$against^{commit}") || die "BUF_BREAKING_AGAINST=$against is not a commit"
        git cat-file -e "$base:proto" 2>/dev/null || die "BUF_BREAKING_AGAINST=$against has no proto/ directory"
        breaking_against "$base"
        say "no breaking changes"
        return 0
    fi
    if ! git rev-parse --git-dir >/dev/null 2>&1; then
        skip_breaking "not a git repository"
        return 0
    fi
    if ! git rev-parse -q --verify 'HEAD^{commit}' >/dev/null; then
        skip_breaking "no commits yet"
        return 0
    fi
    local compared=0
    last=$(git log -1 --format=%H HEAD -- proto)
    if [[ -z $last ]]; then
        skip_breaking "no commit has touched proto/ yet"
    elif grep -qiE '^proto-breaking:[[:space:]]*allowed[[:space:]]*$' <<<"$(git log -1 --format=%B "$last")"; then
        skip_breaking "$(git log -1 --format='%h "%s"' "$last") says Proto-Breaking: allowed"
    elif ! base=$(git rev-parse -q --verify "$last^{commit}^"); then
        if [[ $(git rev-parse --is-shallow-repository) == true ]]; then
            skip_breaking "shallow clone: the parent of ${last:0:12} is missing (git fetch --unshallow)"
        else
            skip_breaking "proto/ first appeared in the root commit ${last:0:12}; nothing earlier to compare with"
        fi
    elif ! git cat-file -e "$base:proto" 2>/dev/null; then
        skip_breaking "proto/ first appeared in ${last:0:12}; its parent has none"
    else
        breaking_against "$base"
        compared=1
    fi
    if [[ -n $(git status --porcelain -- proto) ]] && git cat-file -e "HEAD:proto" 2>/dev/null; then
        say "proto/ has uncommitted changes"
        breaking_against HEAD
        compared=1
    fi
    if ((compared)); then say "no breaking changes"; fi
}

step_buf() {
    ensure_buf
    run "$BUF" --version
    run "$BUF" lint
    step_buf_breaking
}

# ----------------------------------------------------------------- database

pg_bindir() {
    local d
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    if [[ -x $d/initdb && -x $d/pg_ctl ]]; then
        printf '%s\n' "$d"
        return 0
    fi
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    return 1
}

missing_postgres() {
    cat >&2 <<'EOF'
test.sh: error: PostgreSQL server binaries not found (no pg_virtualenv, and no
initdb/pg_ctl in /usr/lib/postgresql/*/bin or on PATH). Install them:
    Debian/Ubuntu:  apt-get install postgresql
or point DATABASE_URL at a server whose user may CREATE DATABASE, e.g.
    DATABASE_URL=postgres://postgres:secret@127.0.0.1:5432/postgres scripts/test.sh
EOF
    exit 1
}

urlencode() {
    local LC_ALL=C s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
        [a-zA-Z0-9._~-]) out+=$c ;;
        *) printf -v c '%%%02X' "'$c" && out+=$c ;;
        esac
    done
    printf '%s' "$out"
}

# Inside pg_virtualenv: PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE
# describe the cluster; sqlx wants one URL.
url_from_pg_env() {
    local user pass auth
    user=$(urlencode "${PGUSER:?}")
    pass=$(urlencode "${PGPASSWORD:-}")
    auth=$user${pass:+:$pass}
    if [[ ${PGHOST:-localhost} == /* ]]; then
        printf 'postgres://%s@/%s?host=%s&port=%s\n' "$auth" "$(urlencode "${PGDATABASE:-postgres}")" \
            "$(urlencode "$PGHOST")" "${PGPORT:-5432}"
    else
        printf 'postgres://%s@%s:%s/%s\n' "$auth" "${PGHOST:-localhost}" "${PGPORT:-5432}" \
            "$(urlencode "${PGDATABASE:-postgres}")"
    fi
}

free_port() {
    local port
    for ((port = 20000 + RANDOM % 20000; port < 65000; port++)); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    return 1
}

# Starts a cluster with initdb/pg_ctl in a temporary directory, for machines
# without pg_virtualenv. initdb refuses to run as root, so root runs it as the
# postgres user.
start_direct_cluster() {
    PG_BINDIR=$(pg_bindir) || missing_postgres
    if [[ $(id -u) == 0 ]]; then
        id -u postgres >/dev/null 2>&1 ||
            die "running as root needs a 'postgres' user to own the throw-away cluster (or set DATABASE_URL)"
        AS_PG=(runuser -u postgres --)
    fi
    PG_DIRECT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vitals-pg.XXXXXX")
    local password port opts s
    password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    printf '%s\n' "$password" >"$PG_DIRECT_DIR/pwfile"
    [[ ${#AS_PG[@]} == 0 ]] || chown -R postgres: "$PG_DIRECT_DIR"
    say "starting a throw-away PostgreSQL cluster in $PG_DIRECT_DIR ($PG_BINDIR)"
    if ! "${AS_PG[@]}" "$PG_BINDIR/initdb" -D "$PG_DIRECT_DIR/data" -U postgres -E UTF8 --no-sync \
        --auth=scram-sha-256 --pwfile="$PG_DIRECT_DIR/pwfile" >"$PG_DIRECT_DIR/initdb.log" 2>&1; then
        cat "$PG_DIRECT_DIR/initdb.log" >&2
        die "initdb failed"
    fi
    port=$(free_port) || die "no free TCP port on 127.0.0.1"
    opts="-p $port -k $PG_DIRECT_DIR -c listen_addresses=127.0.0.1"
    for s in "${PG_SETTINGS[@]}"; do opts+=" -c $s"; done
    if ! "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$PG_DIRECT_DIR/data" -l "$PG_DIRECT_DIR/server.log" \
        -w -t 60 -o "$opts" start >/dev/null; then
        tail -n 50 "$PG_DIRECT_DIR/server.log" >&2 || true
        die "PostgreSQL did not start"
    fi
    export DATABASE_URL="postgres://postgres:$password@127.0.0.1:$port/postgres"
}

# Fails early, with one clear message, when the database is unusable.
check_database() {
    if ! command -v psql >/dev/null; then
        say "psql not found; not checking DATABASE_URL"
        return 0
    fi
    local row
    row=$(psql "$DATABASE_URL" -X -At -v ON_ERROR_STOP=1 -F '|' -c \
        "select current_setting('server_version'), current_setting('max_connections'),
                rolsuper or rolcreatedb from pg_roles where rolname = current_user") ||
        die "cannot connect with DATABASE_URL"
    local version max_connections can_create
    IFS='|' read -r version max_connections can_create <<<"$row"
    say "PostgreSQL $version, max_connections=$max_connections"
    [[ $can_create == t ]] || die "DATABASE_URL's user may not CREATE DATABASE"
    ((max_connections >= PG_MIN_CONNECTIONS)) ||
        say "warning: max_connections=$max_connections is below $PG_MIN_CONNECTIONS; parallel tests may run out"
}

# --------------------------------------------------------- database steps

step_db() {
    header "database"
    printf 'DATABASE_URL=%s\n' "$DATABASE_URL"
    psql "$DATABASE_URL" -X -c 'show max_connections'
}

# Sums libtest's "test result:" lines into one closing line.
print_test_summary() {
    awk '/^test result: / {
            for (i = 2; i <= NF; i++) {
                if ($i == "passed;") p += $(i - 1)
                if ($i == "failed;") f += $(i - 1)
                if ($i == "ignored;") s += $(i - 1)
            }
        }
        END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, s }' "$1"
}

# promtool checks the /metrics scrape and the alert rules in the integration
# tests (tests/integration/metrics.rs). It comes with Debian's prometheus
# package; as root it is installed here when missing (its service is not
# started: only the binaries are used).
ensure_promtool() {
    command -v promtool >/dev/null && return 0
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing promtool (Debian package prometheus)"
        apt-get update -qq </dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus </dev/null
    fi
    command -v promtool >/dev/null ||
        die "promtool is needed by the metrics tests (Debian/Ubuntu: apt-get install prometheus)"
}

step_test() {
    ensure_promtool
    local log="$WORK/cargo-test.log"
    : >"$log"
    if (($#)); then
        run cargo test --locked "$@" | tee -a "$log"
    else
        run cargo test --locked --all-targets | tee -a "$log"
        # The load generator's own tests: its pgbench scripts run the store's
        # statements, so a statement's new parameter must reach them.
        run cargo test --locked -p vitals-bench | tee -a "$log"
        # --all-targets leaves out the doc tests (of the library, if any).
        if [[ -f src/lib.rs ]]; then
            run cargo test --locked --doc | tee -a "$log"
        fi
    fi
    print_test_summary "$log"
}

step_clients() {
    local lang script found=()
    for lang in python node; do
        script="clients/$lang/run_tests.sh"
        [[ -f $script ]] && found+=("$script")
    done
    if ((${#found[@]} == 0)); then
        say "no client test suites (clients/*/run_tests.sh) yet"
        return 0
    fi
    run cargo build --locked --bin vitals
    VITALS_BIN="$(target_dir)/debug/vitals"
    export VITALS_BIN
    for script in "${found[@]}"; do
        run bash "$script"
    done
}

# grpcurl goes into .tools/venv, buf (this script's pin) into .tools/.
step_walkthrough() {
    run cargo build --locked --bin vitals
    VITALS_BIN="$(target_dir)/debug/vitals" BUF_VERSION=$BUF_VERSION run bash scripts/walkthrough.sh
}

run_db_steps() {
    check_database
    if has_step test; then step_test "$@"; fi
    if has_step clients; then step_clients; fi
    if has_step walkthrough; then step_walkthrough; fi
    if has_step db; then step_db; fi
}

# --------------------------------------------------------------------- main

if has_step fmt; then step_fmt; fi
if has_step clippy; then step_clippy; fi
if has_step buf; then step_buf; fi

db_steps=()
for s in test clients walkthrough db; do
    if has_step "$s"; then db_steps+=("$s"); fi
done
((${#db_steps[@]})) || exit 0

if [[ -n ${VITALS_TEST_IN_PG_VIRTUALENV:-} ]]; then
    # Re-executed by the branch below, inside pg_virtualenv.
    DATABASE_URL=$(url_from_pg_env)
    export DATABASE_URL
    run_db_steps "$@"
elif [[ -n ${DATABASE_URL:-} ]]; then
    say "using the DATABASE_URL from the environment"
    run_db_steps "$@"
else
    mode=${VITALS_TEST_PG:-auto}
    if [[ $mode == auto ]]; then
        mode=direct
        if command -v pg_virtualenv >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then
            mode=virtualenv
        fi
    fi
    case $mode in
    virtualenv)
        command -v pg_virtualenv >/dev/null || missing_postgres
        compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing_postgres
        pg_opts=(-t) # -t: cluster in a temporary directory, also as root
        for s in "${PG_SETTINGS[@]}"; do pg_opts+=(-o "$s"); done
        say "starting a throw-away PostgreSQL cluster with pg_virtualenv"
        # pg_virtualenv drops the cluster when the command exits, and exits
        # with the command's status.
        pg_virtualenv "${pg_opts[@]}" \
            env VITALS_TEST_IN_PG_VIRTUALENV=1 VITALS_TEST_STEPS="${db_steps[*]}" \
            bash "$SCRIPT" "$@"
        ;;
    direct)
        start_direct_cluster
        run_db_steps "$@"
        ;;
    *) die "VITALS_TEST_PG must be auto, virtualenv or direct, not '$mode'" ;;
    esac
fi
