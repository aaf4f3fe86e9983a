"""Fixtures: the server run_tests.sh started, and names no other test uses.

Every test works on its own system ids and lock keys, so the tests share one
server and one database without seeing each other's data.
"""

import os
import uuid
from datetime import timedelta

import pytest

from vitals_client import Client


@pytest.fixture(scope="session")
def target() -> str:
    target = os.environ.get("VITALS_TARGET")
    if not target:
        pytest.fail("VITALS_TARGET is not set: run the tests with clients/python/run_tests.sh")
    return target


@pytest.fixture(scope="session")
def lease() -> timedelta:
    """The lease the test server was started with (its --database-lock-idle-tx-timeout-ms)."""
    return timedelta(milliseconds=int(os.environ.get("VITALS_TEST_LOCK_LEASE_MS", "30000")))


@pytest.fixture
def client(target):
    with Client(target) as c:
        yield c


@pytest.fixture
def other_client(target):
    """A second connection, as a second user of vitals would have."""
    with Client(target) as c:
        yield c


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def new_id():
    """Makes ids no other test uses: new_id("run") -> "run-1f3a..."."""
    return unique


@pytest.fixture
def system_id() -> str:
    return unique("py-system")


@pytest.fixture
def lock_key() -> str:
    return unique("py-lock")
