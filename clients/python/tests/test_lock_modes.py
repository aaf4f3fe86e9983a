"""Shared locks, semaphores and elections through the Python client."""

import threading
import time

import pytest

from vitals_client import LockModeMismatch, LockNotAvailable


def test_shared_holders_hold_a_key_together_and_keep_an_exclusive_one_out(client, other_client, lock_key):
    with client.shared_lock(lock_key, wait_timeout=5) as first:
        with other_client.shared_lock(lock_key, wait_timeout=0) as second:
            assert second.fencing_token != first.fencing_token
            with pytest.raises(LockNotAvailable):
                with client.lock(lock_key, wait_timeout=0):
                    pytest.fail("an exclusive lock was granted while readers hold the key")
    with client.lock(lock_key, wait_timeout=0) as writer:
        assert writer.fencing_token > second.fencing_token


def test_a_semaphore_admits_its_size_and_refuses_another_size(client, other_client, lock_key):
    with client.semaphore(lock_key, 2, wait_timeout=5) as a, other_client.semaphore(lock_key, 2, wait_timeout=5) as b:
        assert a.fencing_token != b.fencing_token
        with pytest.raises(LockNotAvailable):
            with client.semaphore(lock_key, 2, wait_timeout=0):
                pytest.fail("a third holder of a semaphore of two")
        with pytest.raises(LockModeMismatch) as raised:
            with client.semaphore(lock_key, 3, wait_timeout=0):
                pytest.fail("a semaphore of another size was granted")
        assert raised.value.metadata["held_as"] == "a semaphore of 2"


def test_observers_see_each_leader_once_in_order(client, other_client, lock_key):
    election = lock_key
    seen = []
    watch = other_client.observe(election)

    def follow():
        for leader in watch:
            seen.append((leader.value, leader.fencing_token))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    tokens = []
    for value in ["first", "second"]:
        with client.campaign(election, value, wait_timeout=5) as leadership:
            tokens.append(leadership.fencing_token)
            deadline = time.monotonic() + 10
            while (value, leadership.fencing_token) not in seen:
                assert time.monotonic() < deadline, f"{value} was not observed: {seen}"
                time.sleep(0.02)
    watch.cancel()
    follower.join(10)
    assert seen == [("first", tokens[0]), ("second", tokens[1])]
    assert watch.last_token == tokens[1]
