"""`WithLock` as a context manager.

One lock is one bidirectional stream: the request side is fed from a queue
(acquire, then keep_alive every third of the lease from a background thread,
then release and half-close); the response side carries `acquired`, then
`released` or an error. The server drops the lock the moment the stream
ends, however it ends, so a crashed client never leaves a lock behind.

If the lock is lost while the block runs (a lease missed, the server's
database session ended), `LockGrant.lost` turns true at once and the block's
exit raises `LockLost`: code after the loss ran without mutual exclusion,
which is what the fencing token protects the resources against.
"""

from __future__ import annotations

import queue
import threading
from datetime import datetime, timedelta
from typing import Iterator, Optional

import grpc

from ._gen.vitals.v1 import lock_pb2, lock_pb2_grpc
from .errors import LockLost, LockProtocolViolation, VitalsError, from_rpc_error
from .types import duration_to_proto, timestamp_from_proto

#: Keep-alives go out every lease * this, leaving two thirds of the lease as
#: slack for a slow thread or network.
KEEPALIVE_FRACTION = 1 / 3

_HALF_CLOSE = object()


class LockGrant:
    """A held lock, as the server granted it.

    Attributes:
        key: the lock key.
        owner: who holds it, as sent.
        fencing_token: strictly increasing across every grant of every key;
            pass it to the resources you write so they can refuse a stale
            holder.
        acquired_at: when the server granted the lock (UTC).
        lease: keep-alives must arrive within this; the client sends them.
        held_for: after release, how long the server held the lock.
    """

    def __init__(self, key: str, owner: str, fencing_token: int, acquired_at: datetime, lease: timedelta):
        self.key = key
        self.owner = owner
        self.fencing_token = fencing_token
        self.acquired_at = acquired_at
        self.lease = lease
        self.held_for: Optional[timedelta] = None
        self._lost: Optional[VitalsError] = None

    @property
    def lost(self) -> bool:
        """True once the lock is known to be lost; it never becomes false again."""
        return self._lost is not None

    def ensure_held(self) -> None:
        """Raises LockLost if the lock is known to be lost, e.g. before a write."""
        if self._lost is not None:
            raise self._lost

    def __repr__(self) -> str:
        return f"LockGrant(key={self.key!r}, fencing_token={self.fencing_token}, lost={self.lost})"


class Lock:
    """A lock to take on entry and release on exit; see `Client.lock`,
    `Client.shared_lock` and `Client.semaphore`.

    Not reentrant, and each `Lock` is used once.
    """

    #: The server's names of the events of this stream.
    _GRANTED, _RELEASED = "acquired", "released"

    def __init__(
        self,
        stub: lock_pb2_grpc.LockServiceStub,
        key: str,
        wait_timeout: Optional[timedelta | float],
        owner: str,
        keepalive_interval: Optional[timedelta | float] = None,
        release_timeout: float = 10.0,
        *,
        mode: int = lock_pb2.LOCK_MODE_EXCLUSIVE,
        max_holders: int = 0,
    ) -> None:
        self._stub = stub
        self._key = key
        self._wait_timeout = wait_timeout
        self._owner = owner
        self._mode = mode
        self._max_holders = max_holders
        self._keepalive_interval = keepalive_interval
        self._release_timeout = release_timeout
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = None
        self._grant: Optional[LockGrant] = None
        self._stop = threading.Event()  # ends the keep-alive thread
        self._releasing = False  # an error after this is not a loss
        self._keepalive: Optional[threading.Thread] = None

    # -------------------------------------------------------------- protocol

    def _outbound(self) -> Iterator[lock_pb2.WithLockRequest]:
        # grpcio consumes this on its own thread; returning half-closes.
        while True:
            item = self._requests.get()
            if item is _HALF_CLOSE:
                return
            yield item

    def acquire(self) -> LockGrant:
        """Takes the lock, waiting up to `wait_timeout` (None: the server's
        default; 0: try once). Raises LockNotAvailable when it was not granted."""
        if self._call is not None:
            raise RuntimeError("a Lock is used once; call client.lock() again")
        self._requests.put(self._first_request())
        self._call = self._open(self._outbound())
        try:
            first = next(self._call)
        except grpc.RpcError as err:
            self._requests.put(_HALF_CLOSE)
            raise from_rpc_error(err) from None
        except StopIteration:
            self._requests.put(_HALF_CLOSE)
            raise LockProtocolViolation(grpc.StatusCode.INTERNAL, "stream ended before acquired") from None
        except BaseException:  # KeyboardInterrupt while waiting: do not leave the wait behind
            self._call.cancel()
            self._requests.put(_HALF_CLOSE)
            raise
        if first.WhichOneof("event") != self._GRANTED:
            self._call.cancel()
            self._requests.put(_HALF_CLOSE)
            raise LockProtocolViolation(grpc.StatusCode.INTERNAL, f"expected {self._GRANTED}, got {first}")
        a = getattr(first, self._GRANTED)
        self._grant = LockGrant(
            key=self._key,
            owner=self._owner,
            fencing_token=a.fencing_token,
            acquired_at=timestamp_from_proto(a.acquired_at),
            lease=a.lease.ToTimedelta(),
        )
        # The stream ends with an error only if the lock is lost (or the
        # channel breaks, which loses it too): record it the moment it ends.
        self._call.add_done_callback(self._on_done)
        interval = self._interval(self._grant.lease)
        if interval is not None:
            self._keepalive = threading.Thread(
                target=self._keep_alive, args=(interval,), name=f"vitals-lock-keepalive:{self._key}", daemon=True
            )
            self._keepalive.start()
        return self._grant

    # The messages of this stream; `Campaign` speaks its own.

    def _open(self, requests):
        return self._stub.WithLock(requests)

    def _first_request(self):
        acquire = lock_pb2.Acquire(key=self._key, owner=self._owner, mode=self._mode, max_holders=self._max_holders)
        if self._wait_timeout is not None:
            acquire.wait_timeout.CopyFrom(duration_to_proto(self._wait_timeout))
        return lock_pb2.WithLockRequest(acquire=acquire)

    def _keep_alive_request(self):
        return lock_pb2.WithLockRequest(keep_alive=lock_pb2.KeepAlive())

    def _release_request(self):
        return lock_pb2.WithLockRequest(release=lock_pb2.Release())

    def _interval(self, lease: timedelta) -> Optional[float]:
        if self._keepalive_interval is None:
            return max(lease.total_seconds() * KEEPALIVE_FRACTION, 0.01)
        seconds = (
            self._keepalive_interval.total_seconds()
            if isinstance(self._keepalive_interval, timedelta)
            else float(self._keepalive_interval)
        )
        return seconds if seconds > 0 else None  # 0 disables keep-alives (tests)

    def _keep_alive(self, interval: float) -> None:
        message = self._keep_alive_request()
        while not self._stop.wait(interval):
            self._requests.put(message)

    def _on_done(self, call: grpc.Call) -> None:
        # Runs on a grpcio thread when the stream has ended for any reason.
        self._stop.set()
        if self._releasing or self._grant is None:
            return
        code = call.code()
        if code == grpc.StatusCode.OK:
            # The server ended the stream without an error while we held the
            # lock: it is gone all the same.
            err: VitalsError = LockLost(code, "the server ended the lock stream", "LOCK_LOST")
        else:
            err = from_rpc_error(call)  # type: ignore[arg-type]
            if not isinstance(err, LockLost):
                err = LockLost(err.code, err.message, err.reason, err.domain, err.metadata)
        self._grant._lost = err

    def release(self) -> timedelta:
        """Releases the lock; returns how long the server held it. Raises
        LockLost if the lock was lost before the release reached the server."""
        grant = self._grant
        if grant is None or self._call is None:
            raise RuntimeError("release() before acquire()")
        if grant._lost is not None:
            self._shutdown()
            raise grant._lost
        self._releasing = True
        self._stop.set()
        if self._keepalive is not None:
            self._keepalive.join()  # so no keep_alive follows the release
        self._requests.put(self._release_request())
        self._requests.put(_HALF_CLOSE)
        outcome: list = []
        # next() has no timeout of its own; a helper thread bounds the wait.
        reader = threading.Thread(target=lambda: outcome.append(self._read_released()), daemon=True)
        reader.start()
        reader.join(self._release_timeout)
        if not outcome:
            self._call.cancel()  # ending the stream releases the lock on the server
            reader.join()
        self._shutdown()
        result = outcome[0]
        if isinstance(result, LockLost):
            grant._lost = grant._lost or result
            raise grant._lost
        if isinstance(result, VitalsError):
            raise result
        grant.held_for = result
        return result

    def _read_released(self):
        try:
            for response in self._call:
                if response.WhichOneof("event") == self._RELEASED:
                    return getattr(response, self._RELEASED).held_for.ToTimedelta()
            return LockProtocolViolation(grpc.StatusCode.INTERNAL, f"stream ended before {self._RELEASED}")
        except grpc.RpcError as err:
            mapped = from_rpc_error(err)
            if mapped.code == grpc.StatusCode.CANCELLED:
                # Our own cancel after release_timeout: the stream is gone,
                # and with it the lock, but there is no confirmation.
                return VitalsError(mapped.code, "no released confirmation within the release timeout")
            return mapped

    def _shutdown(self) -> None:
        self._stop.set()
        self._requests.put(_HALF_CLOSE)  # frees grpcio's request thread if still waiting
        if self._keepalive is not None:
            self._keepalive.join()

    # ------------------------------------------------------- context manager

    def __enter__(self) -> LockGrant:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except LockLost:
            if exc_type is None:
                raise
            # The block already failed; its exception is the one to see. The
            # loss is still recorded on the grant.
        except VitalsError:
            if exc_type is None:
                raise


class Campaign(Lock):
    """Leadership of an election, held for the duration of a `with` block;
    see `Client.campaign`. The grant's `key` is the election, its `owner`
    the candidate's value."""

    _GRANTED, _RELEASED = "elected", "resigned"

    def _open(self, requests):
        return self._stub.Campaign(requests)

    def _first_request(self):
        campaign = lock_pb2.Campaign(election=self._key, candidate_value=self._owner)
        if self._wait_timeout is not None:
            campaign.wait_timeout.CopyFrom(duration_to_proto(self._wait_timeout))
        return lock_pb2.CampaignRequest(campaign=campaign)

    def _keep_alive_request(self):
        return lock_pb2.CampaignRequest(keep_alive=lock_pb2.KeepAlive())

    def _release_request(self):
        return lock_pb2.CampaignRequest(resign=lock_pb2.Resign())


class Leader:
    """An election's leader, as observers are told.

    Attributes:
        value: the leader's candidate value.
        fencing_token: its leadership's token; later leaders have larger ones.
        elected_at, lease_expires_at: when it was elected and when its lease
            ends unless renewed (UTC).
        replica: the vitals replica it campaigned on.
    """

    def __init__(self, value: str, fencing_token: int, elected_at: datetime, lease_expires_at: datetime, replica: str):
        self.value = value
        self.fencing_token = fencing_token
        self.elected_at = elected_at
        self.lease_expires_at = lease_expires_at
        self.replica = replica

    @classmethod
    def from_proto(cls, m) -> "Leader":
        return cls(
            value=m.value,
            fencing_token=m.fencing_token,
            elected_at=timestamp_from_proto(m.elected_at),
            lease_expires_at=timestamp_from_proto(m.lease_expires_at),
            replica=m.replica,
        )

    def __repr__(self) -> str:
        return f"Leader(value={self.value!r}, fencing_token={self.fencing_token})"


class LeaderWatch:
    """An iterator of an election's leaders over one ObserveLeader stream:
    each new leader once, in order. `last_token` is the token of the last
    leader seen: pass it as `after_token` to resume."""

    def __init__(self, call, after_token: int) -> None:
        self._call = call
        self._cancelled = threading.Event()
        self.last_token = after_token

    def __iter__(self) -> "LeaderWatch":
        return self

    def __next__(self) -> Leader:
        try:
            response = next(self._call)
        except grpc.RpcError as err:
            if self._cancelled.is_set() and err.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(err) from None
        leader = Leader.from_proto(response.leader)
        self.last_token = leader.fencing_token
        return leader

    def cancel(self) -> None:
        """Ends the stream; a blocked `next()` then stops the iteration."""
        self._cancelled.set()
        self._call.cancel()

    def __enter__(self) -> "LeaderWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
