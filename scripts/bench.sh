#!/usr/bin/env bash
# Runs the whole benchmark (vitals against pgbench and etcd, and vitals' cost
# of its metrics: a second vitals with them off) and writes
# bench/results/results.md and bench/results/summary.json, and under
# bench/results/raw/ (ignored by git) the whole results.json and the plot (see
# docs/PERFORMANCE.md); with --out-dir DIR, into DIR instead. With `soak` as
# its first argument, runs the soak instead (scripts/soak.sh does that).
#
#   scripts/bench.sh                 # everything, about 8 minutes on 2 cores
#   scripts/bench.sh --soak 300      # with the 5-minute memory soak of the target
#   scripts/bench.sh --duration 3 --workloads lock --clients 1,32   # a quick look
#   scripts/bench.sh --duration 3 --workloads lock-modes --clients 32 --no-pgbench --no-metrics-off
#                                    # shared locks, a semaphore of 4 and an election on one key
#   scripts/bench.sh --workloads none   # only vitals' RSS per held lock (10,000 locks)
#   scripts/bench.sh --no-metrics-off   # without the metrics cost (two more vitals, off and on)
#   scripts/bench.sh soak --minutes 2   # the soak: PostgreSQL restarted twice
#
# Builds vitals in release (the README's build) and the vitals-bench load
# generator (bench/, a workspace member that `cargo build`/`cargo test` skip),
# then runs vitals-bench, which starts on loopback, and stops at exit: a
# throw-away PostgreSQL cluster (or a fresh database on DATABASE_URL; never
# for the soak, which restarts its cluster), vitals and etcd. Every other
# argument goes to vitals-bench (`--help` and `soak --help` list them).
#
# Installs what is missing with apt-get (--no-install-recommends) when run as
# root: protobuf-compiler and libprotobuf-dev (etcd-client's build needs
# protoc and the google/protobuf/*.proto it imports; protoc only recommends
# them) and postgresql (initdb and pg_ctl for the throw-away cluster, and
# pgbench: Debian ships pgbench with the server, not in postgresql-client,
# whose /usr/bin/pgbench is only pg_wrapper's link); for the benchmark also
# etcd-server (the peer), postgresql-client (psql, for a DATABASE_URL) and
# fonts-dejavu-core (the plot's labels).
#
# Environment:
#   DATABASE_URL      an admin URL to use instead of a throw-away cluster; a
#                     database vitals_bench_<random> is created and dropped
#   CARGO_TARGET_DIR  honoured; the build cache is never cleaned

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { printf 'bench.sh: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

mode=bench
if [[ ${1:-} == soak ]]; then
    mode=soak
    shift
fi

# ------------------------------------------------------------ prerequisites

missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
if [[ -z ${PROTOC_INCLUDE:-} ]] && ! compgen -G '/usr/include/google/protobuf/descriptor.proto' >/dev/null &&
    ! compgen -G '/usr/local/include/google/protobuf/descriptor.proto' >/dev/null; then
    missing+=(libprotobuf-dev)
fi
if [[ $mode == soak ]]; then
    # The soak always starts its own cluster: it restarts it.
    compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
else
    command -v etcd >/dev/null || missing+=(etcd-server)
    # A pgbench on PATH counts unless it is Debian's pg_wrapper link, which
    # works only once a server package brought the real one.
    has_pgbench() {
        compgen -G '/usr/lib/postgresql/*/bin/pgbench' >/dev/null ||
            { command -v pgbench >/dev/null && [[ $(readlink -f "$(command -v pgbench)") != */pg_wrapper ]]; }
    }
    if ! has_pgbench ||
        { [[ -z ${DATABASE_URL:-} ]] && ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; }; then
        missing+=(postgresql)
    fi
    command -v psql >/dev/null || missing+=(postgresql-client)
    if ! compgen -G '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf' >/dev/null &&
        ! { command -v fc-match >/dev/null && [[ -n $(fc-match -f '%{file}' sans-serif 2>/dev/null) ]]; }; then
        missing+=(fonts-dejavu-core)
    fi
fi
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        die "missing ${missing[*]}: install them (Debian/Ubuntu: apt-get install ${missing[*]})"
    fi
fi

# -------------------------------------------------------------------- build

target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir="$ROOT/$target_dir"

say "building vitals (release)"
cargo build --release --locked --bin vitals
say "building vitals-bench (release)"
cargo build --release --locked -p vitals-bench

# ---------------------------------------------------------------------- run

# vitals-bench stops what it started itself, also on Ctrl-C or an error. If
# it is killed outright, this trap stops what its pid file names and the
# throw-away cluster, then removes the scratch directory.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vitals-bench.XXXXXX")
cleanup() {
    local pid name
    if [[ -f $WORK/pids ]]; then
        while read -r pid name; do
            if kill -0 "$pid" 2>/dev/null; then
                say "stopping leftover $name ($pid)"
                kill -TERM "$pid" 2>/dev/null || true
            fi
        done <"$WORK/pids"
    fi
    if [[ -f $WORK/pg/data/postmaster.pid ]]; then
        local pg_ctl
        pg_ctl=$(printf '%s\n' /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)
        if [[ $(id -u) == 0 ]]; then
            runuser -u postgres -- "$pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
        else
            "$pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
        fi
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $mode == soak ]]; then
    "$target_dir/release/vitals-bench" soak \
        --vitals-bin "$target_dir/release/vitals" \
        --work-dir "$WORK" \
        "$@"
    exit
fi
# bench/results unless an --out-dir is given (vitals-bench takes one only).
out_dir=(--out-dir "$ROOT/bench/results")
for arg in "$@"; do
    if [[ $arg == --out-dir || $arg == --out-dir=* ]]; then
        out_dir=()
    fi
done
if ((${#out_dir[@]})); then
    mkdir -p bench/results
fi
say "load average: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine shows in the results' CPU column)"
"$target_dir/release/vitals-bench" \
    --vitals-bin "$target_dir/release/vitals" \
    "${out_dir[@]}" \
    --work-dir "$WORK" \
    "$@"
