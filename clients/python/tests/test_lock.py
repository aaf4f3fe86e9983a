"""LockService (WithLock) through the Python client's context manager."""

import json
import select
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from vitals_client import InvalidArgument, LockLost, LockNotAvailable

HOLDER = Path(__file__).with_name("lock_holder.py")


def wait_until(condition, timeout: float, what: str) -> None:
    """Polls condition() until true; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Holder:
    """lock_holder.py in its own process."""

    def __init__(self, target: str, key: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLDER), target, key],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self, timeout: float = 20) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"lock_holder.py said nothing for {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"lock_holder.py exited with {self.proc.wait()}"
        return json.loads(line)

    def release(self) -> dict:
        self.proc.stdin.write("release\n")
        self.proc.stdin.flush()
        reply = self.read()
        assert self.proc.wait(timeout=10) == 0
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_a_lock_is_granted_with_a_fencing_token_and_the_servers_lease(client, lock_key, lease):
    with client.lock(lock_key, owner="pytest") as grant:
        assert grant.key == lock_key
        assert grant.fencing_token > 0
        assert grant.lease == lease
        assert grant.acquired_at.tzinfo is not None
        assert not grant.lost
    assert grant.held_for is not None and grant.held_for >= timedelta(0)


def test_a_lock_held_in_another_process_is_not_available_until_released(target, client, lock_key):
    holder = Holder(target, lock_key)
    try:
        first_token = holder.read()["fencing_token"]

        with pytest.raises(LockNotAvailable) as raised:
            with client.lock(lock_key, wait_timeout=0):
                pytest.fail("granted while another process holds the lock")
        err = raised.value
        assert err.code == grpc.StatusCode.ABORTED
        assert err.reason == "LOCK_NOT_AVAILABLE"
        assert err.metadata == {"key": lock_key}

        assert holder.release()["held_for_ms"] > 0
        with client.lock(lock_key, wait_timeout=0) as grant:
            assert grant.fencing_token > first_token
    finally:
        holder.kill()


def test_a_waiter_gets_the_lock_as_soon_as_the_holder_releases(target, client, lock_key):
    holder = Holder(target, lock_key)
    try:
        first_token = holder.read()["fencing_token"]
        granted = []

        def wait_for_it():
            with client.lock(lock_key, wait_timeout=20) as grant:
                granted.append((time.monotonic(), grant.fencing_token))

        # Waiters queue inside vitals, where a test cannot see them: what is
        # asserted is that the waiter is granted only after the holder let
        # go, and promptly then.
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        assert granted == []
        released_at = time.monotonic()
        holder.release()
        waiter.join(10)
        assert granted, "the waiter was never granted"
        granted_at, token = granted[0]
        assert granted_at >= released_at, "granted before the holder released"
        assert granted_at - released_at < 2, f"granted {granted_at - released_at:.3f} s after the release"
        assert token > first_token
    finally:
        holder.kill()


def test_a_short_wait_ends_in_lock_not_available(client, other_client, lock_key):
    with client.lock(lock_key):
        started = time.monotonic()
        with pytest.raises(LockNotAvailable):
            with other_client.lock(lock_key, wait_timeout=timedelta(milliseconds=300)):
                pass
        assert time.monotonic() - started >= 0.25


def test_background_keep_alives_hold_the_lock_for_several_leases(client, other_client, lock_key, lease):
    with client.lock(lock_key) as grant:
        held_until = time.monotonic() + 2.5 * lease.total_seconds()
        while time.monotonic() < held_until:
            assert not grant.lost
            time.sleep(0.1)
        with pytest.raises(LockNotAvailable):
            with other_client.lock(lock_key, wait_timeout=0):
                pass
    assert grant.held_for >= 2.5 * lease


def test_without_keep_alives_the_lock_is_lost_after_the_lease(client, other_client, lock_key, lease):
    with pytest.raises(LockLost) as raised:
        with client.lock(lock_key, keepalive_interval=0) as grant:
            wait_until(lambda: grant.lost, 3 * lease.total_seconds(), "the lease to run out")
            with pytest.raises(LockLost):
                grant.ensure_held()
            # Once lost, the lock is free for others.
            with other_client.lock(lock_key, wait_timeout=5) as next_grant:
                assert next_grant.fencing_token > grant.fencing_token
    assert raised.value.reason == "LOCK_LOST"
    assert raised.value.code == grpc.StatusCode.ABORTED
    assert raised.value.metadata == {"key": lock_key}


def test_an_error_in_the_block_releases_the_lock_and_propagates(client, lock_key):
    with pytest.raises(ZeroDivisionError):
        with client.lock(lock_key):
            1 / 0
    with client.lock(lock_key, wait_timeout=0) as grant:
        assert grant.fencing_token > 0


def test_fencing_tokens_increase_across_keys(client, new_id):
    tokens = []
    for _ in range(3):
        with client.lock(new_id("py-lock"), wait_timeout=0) as grant:
            tokens.append(grant.fencing_token)
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


def test_an_empty_key_is_an_invalid_argument(client):
    with pytest.raises(InvalidArgument) as raised:
        with client.lock(""):
            pass
    assert [v.field for v in raised.value.violations] == ["acquire.key"]


def test_a_lock_object_is_used_once(client, lock_key):
    lock = client.lock(lock_key)
    with lock:
        pass
    with pytest.raises(RuntimeError):
        lock.acquire()
