#!/usr/bin/env bash
# Soak test: mixed load at the concurrency limit for 10 minutes while
# PostgreSQL is restarted twice; prints requests per status code, latency, and
# whether any acknowledged run was lost or any call failed other than with
# UNAVAILABLE/ABORTED. With --lock-cycles N: N WithLock cycles, checking that
# nothing grows per acquisition: vitals' memory and lock sessions after the
# first 1,000 are compared with those after all N. Not part of scripts/test.sh.
#
# Usage: scripts/soak.sh [--minutes N] [--concurrency N] [--lock-cycles N] [--log FILE]
#
# It is `vitals-bench soak`, built and run by scripts/bench.sh with the
# benchmark's set-up (a throw-away PostgreSQL cluster it can restart, vitals
# on loopback, both stopped at exit); `scripts/bench.sh soak --help` lists
# every option.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/bench.sh" soak "$@"
