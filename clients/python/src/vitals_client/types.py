"""Plain Python values for vitals' messages, converted at the edge.

Callers see enums, `datetime` (always UTC-aware), `timedelta` and frozen
dataclasses, never protobuf messages. Every `from_proto` here is the single
place a message is read; every `to_proto` the single place one is built.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Optional, Union

from google.protobuf import duration_pb2, timestamp_pb2

from ._gen.vitals.v1 import health_pb2 as pb


class HealthStatus(enum.IntEnum):
    """Status of a run, a check or a system (`vitals.v1.HealthStatus`)."""

    UNSPECIFIED = pb.HEALTH_STATUS_UNSPECIFIED
    HEALTHY = pb.HEALTH_STATUS_HEALTHY
    DEGRADED = pb.HEALTH_STATUS_DEGRADED
    UNHEALTHY = pb.HEALTH_STATUS_UNHEALTHY

    @classmethod
    def parse(cls, value: StatusLike) -> HealthStatus:
        """Accepts a HealthStatus, its name in any case (`"degraded"`), or the
        proto name (`"HEALTH_STATUS_DEGRADED"`)."""
        if isinstance(value, HealthStatus):
            return value
        if isinstance(value, str):
            name = value.strip().upper().removeprefix("HEALTH_STATUS_")
            try:
                return cls[name]
            except KeyError:
                raise ValueError(f"unknown health status {value!r}") from None
        return cls(value)


StatusLike = Union[HealthStatus, str, int]


class EvaluationMode(enum.IntEnum):
    """The rule family of an evaluation."""

    UNSPECIFIED = pb.EVALUATION_MODE_UNSPECIFIED
    CONSECUTIVE = pb.EVALUATION_MODE_CONSECUTIVE
    WINDOW = pb.EVALUATION_MODE_WINDOW


class EvaluationRule(enum.IntEnum):
    """The rule that decided an evaluation."""

    UNSPECIFIED = pb.EVALUATION_RULE_UNSPECIFIED
    NO_RUNS = pb.EVALUATION_RULE_NO_RUNS
    UNHEALTHY_THRESHOLD_REACHED = pb.EVALUATION_RULE_UNHEALTHY_THRESHOLD_REACHED
    DEGRADED_THRESHOLD_REACHED = pb.EVALUATION_RULE_DEGRADED_THRESHOLD_REACHED
    BELOW_DEGRADED_THRESHOLD = pb.EVALUATION_RULE_BELOW_DEGRADED_THRESHOLD
    RECOVERY_CONFIRMED = pb.EVALUATION_RULE_RECOVERY_CONFIRMED
    RECOVERY_NOT_CONFIRMED = pb.EVALUATION_RULE_RECOVERY_NOT_CONFIRMED


def _enum(cls: type[enum.IntEnum], raw: int) -> enum.IntEnum:
    # A newer server may send a value this client does not know yet.
    try:
        return cls(raw)
    except ValueError:
        return cls(0)


@dataclass(frozen=True)
class Consecutive:
    """Judge a check by the streak of its newest runs (the server's defaults)."""

    healthy_min_success_count: int = 1
    degraded_min_failure_count: int = 2
    unhealthy_min_failure_count: int = 5


@dataclass(frozen=True)
class Window:
    """Judge a check by the failures among its newest `window_size` runs."""

    window_size: int = 10
    degraded_min_failure_count: int = 3
    unhealthy_min_failure_count: int = 7


Thresholds = Union[Consecutive, Window]


def thresholds_to_proto(t: Thresholds) -> pb.Thresholds:
    if isinstance(t, Consecutive):
        return pb.Thresholds(
            consecutive=pb.ConsecutiveThresholds(
                healthy_min_success_count=t.healthy_min_success_count,
                degraded_min_failure_count=t.degraded_min_failure_count,
                unhealthy_min_failure_count=t.unhealthy_min_failure_count,
            )
        )
    if isinstance(t, Window):
        return pb.Thresholds(
            window=pb.WindowThresholds(
                window_size=t.window_size,
                degraded_min_failure_count=t.degraded_min_failure_count,
                unhealthy_min_failure_count=t.unhealthy_min_failure_count,
            )
        )
    raise TypeError(f"thresholds must be Consecutive or Window, not {type(t).__name__}")


def thresholds_from_proto(m: pb.Thresholds) -> Optional[Thresholds]:
    mode = m.WhichOneof("mode")
    if mode == "consecutive":
        c = m.consecutive
        return Consecutive(c.healthy_min_success_count, c.degraded_min_failure_count, c.unhealthy_min_failure_count)
    if mode == "window":
        w = m.window
        return Window(w.window_size, w.degraded_min_failure_count, w.unhealthy_min_failure_count)
    return None


def timestamp_to_proto(t: datetime) -> timestamp_pb2.Timestamp:
    if t.tzinfo is None:
        # A naive datetime is ambiguous: local time or UTC? Refuse to guess.
        raise ValueError("timestamps must be timezone-aware (e.g. datetime.now(timezone.utc))")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t.astimezone(timezone.utc))
    return ts


def timestamp_from_proto(m: timestamp_pb2.Timestamp) -> datetime:
    return m.ToDatetime(tzinfo=timezone.utc)


def duration_to_proto(d: timedelta | float) -> duration_pb2.Duration:
    if not isinstance(d, timedelta):
        d = timedelta(seconds=d)
    out = duration_pb2.Duration()
    out.FromTimedelta(d)
    return out


@dataclass(frozen=True)
class Evaluation:
    """How a status was reached."""

    mode: EvaluationMode
    runs_considered: int
    leading_failure_streak: int
    leading_success_streak: int
    failures_in_window: int
    rule: EvaluationRule
    thresholds: Optional[Thresholds]

    @classmethod
    def from_proto(cls, m: pb.Evaluation) -> Evaluation:
        return cls(
            mode=_enum(EvaluationMode, m.mode),
            runs_considered=m.runs_considered,
            leading_failure_streak=m.leading_failure_streak,
            leading_success_streak=m.leading_success_streak,
            failures_in_window=m.failures_in_window,
            rule=_enum(EvaluationRule, m.rule),
            thresholds=thresholds_from_proto(m.thresholds) if m.HasField("thresholds") else None,
        )


@dataclass(frozen=True)
class EvaluationResult:
    """The verdict of EvaluateHealth."""

    status: HealthStatus
    evaluation: Evaluation


@dataclass(frozen=True)
class Run:
    """One recorded run of a check."""

    run_id: str
    system_id: str
    check_id: str
    status: HealthStatus
    observed_at: datetime
    latency: Optional[timedelta]
    message: str
    recorded_at: Optional[datetime]

    @classmethod
    def from_proto(cls, m: pb.Run) -> Run:
        return cls(
            run_id=m.run_id,
            system_id=m.system_id,
            check_id=m.check_id,
            status=_enum(HealthStatus, m.status),
            observed_at=timestamp_from_proto(m.observed_at),
            latency=m.latency.ToTimedelta() if m.HasField("latency") else None,
            message=m.message,
            recorded_at=timestamp_from_proto(m.recorded_at) if m.HasField("recorded_at") else None,
        )


@dataclass(frozen=True)
class FlappingSettings:
    """Flapping detection of a check: it starts flapping at `start_changes`
    status changes among its newest `runs` runs and stops only below
    `stop_changes`."""

    runs: int
    start_changes: int
    stop_changes: int

    def to_proto(self) -> pb.FlappingSettings:
        return pb.FlappingSettings(
            runs=self.runs, start_changes=self.start_changes, stop_changes=self.stop_changes
        )

    @classmethod
    def from_proto(cls, m: pb.FlappingSettings) -> FlappingSettings:
        return cls(runs=m.runs, start_changes=m.start_changes, stop_changes=m.stop_changes)


@dataclass(frozen=True)
class MaintenanceWindow:
    """A period in which a system's transitions are marked `in_maintenance`
    and its time is left out of uptime percentages."""

    starts_at: datetime
    ends_at: datetime
    reason: str = ""

    @classmethod
    def from_proto(cls, m: pb.MaintenanceWindow) -> MaintenanceWindow:
        return cls(
            starts_at=timestamp_from_proto(m.starts_at),
            ends_at=timestamp_from_proto(m.ends_at),
            reason=m.reason,
        )


@dataclass(frozen=True)
class CheckHealth:
    """The health of one check."""

    check_id: str
    status: HealthStatus
    evaluation: Optional[Evaluation]
    runs_considered: int
    last_run_at: Optional[datetime]
    thresholds: Optional[Thresholds]
    enabled: bool
    #: True while the check flaps (always False with detection off).
    flapping: bool = False
    #: The check's flapping detection; None when off.
    flapping_settings: Optional[FlappingSettings] = None

    @classmethod
    def from_proto(cls, m: pb.CheckHealth) -> CheckHealth:
        return cls(
            check_id=m.check_id,
            status=_enum(HealthStatus, m.status),
            evaluation=Evaluation.from_proto(m.evaluation) if m.HasField("evaluation") else None,
            runs_considered=m.runs_considered,
            last_run_at=timestamp_from_proto(m.last_run_at) if m.HasField("last_run_at") else None,
            thresholds=thresholds_from_proto(m.thresholds) if m.HasField("thresholds") else None,
            enabled=m.enabled,
            flapping=m.flapping,
            flapping_settings=(
                FlappingSettings.from_proto(m.flapping_settings) if m.HasField("flapping_settings") else None
            ),
        )


@dataclass(frozen=True)
class SystemHealth:
    """The health of a system and of every one of its checks."""

    system_id: str
    status: HealthStatus
    checks: tuple[CheckHealth, ...] = field(default_factory=tuple)
    evaluated_at: Optional[datetime] = None
    #: Open and upcoming maintenance windows (filled by get_system_health
    #: and the maintenance calls; empty in the replies of runs and checks).
    maintenance_windows: tuple[MaintenanceWindow, ...] = field(default_factory=tuple)
    #: True while one of them is open.
    in_maintenance: bool = False
    #: The systems this one depends on.
    depends_on: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_proto(cls, m: pb.SystemHealth) -> SystemHealth:
        return cls(
            system_id=m.system_id,
            status=_enum(HealthStatus, m.status),
            checks=tuple(CheckHealth.from_proto(c) for c in m.checks),
            evaluated_at=timestamp_from_proto(m.evaluated_at) if m.HasField("evaluated_at") else None,
            maintenance_windows=tuple(MaintenanceWindow.from_proto(w) for w in m.maintenance_windows),
            in_maintenance=m.in_maintenance,
            depends_on=tuple(m.depends_on),
        )

    def check(self, check_id: str) -> CheckHealth:
        """The check named `check_id`; KeyError if the system has none."""
        for c in self.checks:
            if c.check_id == check_id:
                return c
        raise KeyError(check_id)


@dataclass(frozen=True)
class Transition:
    """A change of a system's status."""

    sequence: int
    system_id: str
    check_id: str
    from_status: HealthStatus
    to_status: HealthStatus
    transitioned_at: datetime
    evaluation: Optional[Evaluation]
    #: Caused by deleting the check.
    check_deleted: bool = False
    #: Recorded during a maintenance window of the system.
    in_maintenance: bool = False
    #: Recorded while the causing check flapped.
    flapping: bool = False
    #: Dependencies already non-healthy when the system got worse.
    caused_by: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_proto(cls, m: pb.HealthTransition) -> Transition:
        return cls(
            sequence=m.sequence,
            system_id=m.system_id,
            check_id=m.check_id,
            from_status=_enum(HealthStatus, m.from_status),
            to_status=_enum(HealthStatus, m.to_status),
            transitioned_at=timestamp_from_proto(m.transitioned_at),
            evaluation=Evaluation.from_proto(m.evaluation) if m.HasField("evaluation") else None,
            check_deleted=m.check_deleted,
            in_maintenance=m.in_maintenance,
            flapping=m.flapping,
            caused_by=tuple(m.caused_by),
        )


@dataclass(frozen=True)
class SubmitRunResult:
    """What SubmitRun did."""

    run: Run
    system_health: SystemHealth
    #: Set only when this run changed the system's status.
    transition: Optional[Transition]
    #: True when the same run_id with the same content was already stored.
    duplicate: bool


@dataclass(frozen=True)
class ConfigureCheckResult:
    """What ConfigureCheck did."""

    check: CheckHealth
    system_health: SystemHealth
    #: Set only when the change altered the system's status.
    transition: Optional[Transition]


@dataclass(frozen=True)
class SystemSummary:
    """One row of list_systems."""

    system_id: str
    status: HealthStatus
    check_count: int
    last_run_at: Optional[datetime]
    in_maintenance: bool
    flapping: bool
    evaluated_at: Optional[datetime]

    @classmethod
    def from_proto(cls, m: pb.SystemSummary) -> SystemSummary:
        return cls(
            system_id=m.system_id,
            status=_enum(HealthStatus, m.status),
            check_count=m.check_count,
            last_run_at=timestamp_from_proto(m.last_run_at) if m.HasField("last_run_at") else None,
            in_maintenance=m.in_maintenance,
            flapping=m.flapping,
            evaluated_at=timestamp_from_proto(m.evaluated_at) if m.HasField("evaluated_at") else None,
        )


@dataclass(frozen=True)
class DeleteCheckResult:
    """What DeleteCheck did."""

    #: False when there was nothing to delete.
    deleted: bool
    #: The system without the check; None when the system does not exist.
    system_health: Optional[SystemHealth]
    #: Set only when removing the check changed the system's status.
    transition: Optional[Transition]


@dataclass(frozen=True)
class SetMaintenanceResult:
    """What SetMaintenance did."""

    #: The window as stored, merged with those it overlapped or touched.
    window: MaintenanceWindow
    system_health: SystemHealth


@dataclass(frozen=True)
class ClearMaintenanceResult:
    """What ClearMaintenance did."""

    #: Windows ended (the open one) or removed (upcoming ones).
    cleared: int
    #: None when the system does not exist.
    system_health: Optional[SystemHealth]


@dataclass(frozen=True)
class Uptime:
    """A system's time per status over a window ending now."""

    system_id: str
    window_start: datetime
    window_end: datetime
    counted_from: datetime
    healthy: timedelta
    degraded: timedelta
    unhealthy: timedelta
    maintenance: timedelta
    healthy_percent: float
    degraded_percent: float
    unhealthy_percent: float

    @classmethod
    def from_proto(cls, m: pb.GetUptimeResponse) -> Uptime:
        return cls(
            system_id=m.system_id,
            window_start=timestamp_from_proto(m.window_start),
            window_end=timestamp_from_proto(m.window_end),
            counted_from=timestamp_from_proto(m.counted_from),
            healthy=m.healthy.ToTimedelta(),
            degraded=m.degraded.ToTimedelta(),
            unhealthy=m.unhealthy.ToTimedelta(),
            maintenance=m.maintenance.ToTimedelta(),
            healthy_percent=m.healthy_percent,
            degraded_percent=m.degraded_percent,
            unhealthy_percent=m.unhealthy_percent,
        )
