"""A second process holding a vitals lock, driven over stdin/stdout.

Usage: python lock_holder.py TARGET KEY
Takes KEY, prints {"fencing_token": N}, then waits for a line on stdin and
releases, printing {"held_for_ms": N}. test_lock.py runs it to hold a lock in
a different process (and so on a different connection) than the test itself.
"""

import json
import sys

from vitals_client import Client


def say(**fields):
    print(json.dumps(fields), flush=True)


def main() -> int:
    target, key = sys.argv[1], sys.argv[2]
    with Client(target) as client, client.lock(key, wait_timeout=10, owner="lock_holder.py") as grant:
        say(fencing_token=grant.fencing_token)
        sys.stdin.readline()  # held, with keep-alives, until the test says so
    say(held_for_ms=grant.held_for.total_seconds() * 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
