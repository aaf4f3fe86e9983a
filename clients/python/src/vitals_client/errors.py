"""Exceptions raised by the client, one class per `ErrorInfo.reason` that a
caller is expected to handle differently.

vitals puts a `google.rpc.Status` with an `ErrorInfo` (and, depending on the
error, `BadRequest`, `PreconditionFailure` or `RetryInfo`) into the
`grpc-status-details-bin` trailer of every error. `from_rpc_error` parses it
once, here, so callers branch on exception types and `reason` rather than on
message text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

#: `ErrorInfo.domain` of the errors vitals produces.
ERROR_DOMAIN = "vitals.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, from `google.rpc.BadRequest`."""

    field: str
    description: str


class VitalsError(Exception):
    """A failed vitals RPC.

    Attributes:
        code: the gRPC status code.
        message: the server's message (fixed text, safe to log).
        reason: `ErrorInfo.reason`, e.g. `"LOCK_NOT_AVAILABLE"`; None when the
            error carried no ErrorInfo (a transport failure, a proxy).
        domain: `ErrorInfo.domain`, `"vitals.dev"` for vitals' own errors.
        metadata: `ErrorInfo.metadata`, e.g. `{"key": "..."}` for lock errors.
        violations: `BadRequest` field violations (INVALID_ARGUMENT).
        retry_delay: `RetryInfo.retry_delay`, when the server suggested one.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: tuple[FieldViolation, ...] = (),
        retry_delay: timedelta | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = violations
        self.retry_delay = retry_delay

    @property
    def retryable(self) -> bool:
        """True for UNAVAILABLE, the only code vitals marks as safe to retry."""
        return self.code == grpc.StatusCode.UNAVAILABLE


class InvalidArgument(VitalsError):
    """INVALID_ARGUMENT: see `violations` for every offending field."""


class SystemNotFound(VitalsError):
    """NOT_FOUND, reason SYSTEM_NOT_FOUND."""


class RunIdConflict(VitalsError):
    """ALREADY_EXISTS, reason RUN_ID_CONFLICT: the run_id is stored with other content."""


class LockError(VitalsError):
    """Base of the lock errors."""


class LockNotAvailable(LockError):
    """ABORTED, reason LOCK_NOT_AVAILABLE: another holder kept the lock for
    the whole wait (or at once, with `wait_timeout=0`)."""


class LockLost(LockError):
    """ABORTED, reason LOCK_LOST: the lease ran out or the lock's database
    session ended while held. Anything done after the loss was unprotected."""


class LockModeMismatch(LockError):
    """FAILED_PRECONDITION, reason LOCK_MODE_MISMATCH: the key is in use as a
    semaphore of another size, or as a plain lock (see `metadata["held_as"]`)."""


class LockNotHeld(LockError):
    """NOT_FOUND, reason LOCK_NOT_HELD: nobody holds or waits for the key."""


class LockProtocolViolation(LockError):
    """FAILED_PRECONDITION, reason LOCK_PROTOCOL_VIOLATION: a bug in the client."""


class Unavailable(VitalsError):
    """UNAVAILABLE (pool exhausted, system busy, database down, shutting
    down): retry, after `retry_delay` when given."""


_BY_REASON: dict[str, type[VitalsError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "SYSTEM_NOT_FOUND": SystemNotFound,
    "RUN_ID_CONFLICT": RunIdConflict,
    "LOCK_NOT_AVAILABLE": LockNotAvailable,
    "LOCK_LOST": LockLost,
    "LOCK_PROTOCOL_VIOLATION": LockProtocolViolation,
    "LOCK_MODE_MISMATCH": LockModeMismatch,
    "LOCK_NOT_HELD": LockNotHeld,
}

_BY_CODE: dict[grpc.StatusCode, type[VitalsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(err: grpc.RpcError) -> VitalsError:
    """Turns a grpcio error (which is also a `grpc.Call`) into a VitalsError."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message: str = (err.details() if hasattr(err, "details") else None) or ""
    reason = domain = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_delay = None
    try:
        status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    except ValueError:  # details disagree with the status line: ignore them
        status = None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad):
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Unpack(retry):
            retry_delay = retry.retry_delay.ToTimedelta()
    cls = _BY_REASON.get(reason or "") or _BY_CODE.get(code, VitalsError)
    return cls(code, message, reason, domain, metadata, tuple(violations), retry_delay)
