"""Python client for vitals (`vitals.v1`): health-check evaluation and
distributed advisory locks over gRPC.

Layout:
- `client`: `Client`, the typed helpers, one per RPC, and `TransitionWatch`.
- `lock`: `Lock` and `LockGrant`, WithLock as a context manager (exclusive,
  shared, semaphore), `Campaign` for elections and `LeaderWatch`, with
  background keep-alives.
- `types`: the plain values (enums, dataclasses) requests take and
  responses become.
- `errors`: `VitalsError` and its subclasses, built from the ErrorInfo in
  the status details.
- `_gen`: code generated from proto/ when the package is built; not in git.
"""

from .client import Client, TransitionWatch
from .errors import (
    ERROR_DOMAIN,
    FieldViolation,
    InvalidArgument,
    LockError,
    LockLost,
    LockModeMismatch,
    LockNotAvailable,
    LockNotHeld,
    LockProtocolViolation,
    RunIdConflict,
    SystemNotFound,
    Unavailable,
    VitalsError,
)
from .lock import Campaign, Leader, LeaderWatch, Lock, LockGrant
from .types import (
    CheckHealth,
    ClearMaintenanceResult,
    ConfigureCheckResult,
    DeleteCheckResult,
    FlappingSettings,
    MaintenanceWindow,
    SetMaintenanceResult,
    SystemSummary,
    Uptime,
    Consecutive,
    Evaluation,
    EvaluationMode,
    EvaluationResult,
    EvaluationRule,
    HealthStatus,
    Run,
    SubmitRunResult,
    SystemHealth,
    Transition,
    Window,
)

__all__ = [
    "ERROR_DOMAIN",
    "CheckHealth",
    "ClearMaintenanceResult",
    "Client",
    "ConfigureCheckResult",
    "DeleteCheckResult",
    "FlappingSettings",
    "MaintenanceWindow",
    "SetMaintenanceResult",
    "SystemSummary",
    "Uptime",
    "Consecutive",
    "Evaluation",
    "EvaluationMode",
    "EvaluationResult",
    "EvaluationRule",
    "FieldViolation",
    "HealthStatus",
    "InvalidArgument",
    "Campaign",
    "Leader",
    "LeaderWatch",
    "Lock",
    "LockError",
    "LockGrant",
    "LockLost",
    "LockModeMismatch",
    "LockNotAvailable",
    "LockNotHeld",
    "LockProtocolViolation",
    "Run",
    "RunIdConflict",
    "SubmitRunResult",
    "SystemHealth",
    "SystemNotFound",
    "Transition",
    "TransitionWatch",
    "Unavailable",
    "VitalsError",
    "Window",
]
