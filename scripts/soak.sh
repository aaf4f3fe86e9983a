#!/usr/bin/env bash
# Soak test: mixed load at the concurrency limit for 10 minutes while
# PostgreSQL is restarted twice; prints requests per status code, latency, and
# whether any acknowledged run was lost or any call failed other than with
# UNAVAILABLE/ABORTED. With --lock-cycles N: N WithLock cycles, checking that
# nothing grows per acquisition: vitals' memory and lock sessions after the
# first 1,000 are compared with those after all N. Not part of scripts/test.sh.
#
# Usage: scripts/soak.sh [--minutes N] [--concurrency N] [--lock-cycles N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked --bin vitals --example soak
target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/examples/soak" --vitals-bin "$target_dir/release/vitals" "$@"
