"""`Client`: typed helpers over the generated stubs.

Each helper builds its request from plain Python values, calls the stub with
a deadline, turns `grpc.RpcError` into a `VitalsError` subclass and the
response into the dataclasses of `vitals_client.types`.

Transport notes:
- TCP_NODELAY: grpcio's core sets it on every TCP socket it opens (Linux and
  macOS), so small messages such as lock keep-alives are not held back by
  Nagle's algorithm; there is no option to set.
- Deadlines: unary helpers use `timeout` (seconds, default 10) unless a call
  passes its own. The streams (WatchTransitions, WithLock) have none by
  default: they live as long as their consumer wants them.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Iterable, Iterator, Optional, Sequence

import grpc

from ._gen.vitals.v1 import health_pb2 as pb
from ._gen.vitals.v1 import health_pb2_grpc, lock_pb2, lock_pb2_grpc
from .errors import VitalsError, from_rpc_error
from .lock import Campaign, LeaderWatch, Lock
from .types import (
    ClearMaintenanceResult,
    ConfigureCheckResult,
    DeleteCheckResult,
    FlappingSettings,
    MaintenanceWindow,
    SetMaintenanceResult,
    SystemSummary,
    Uptime,
    EvaluationResult,
    Evaluation,
    HealthStatus,
    Run,
    StatusLike,
    SubmitRunResult,
    SystemHealth,
    CheckHealth,
    Thresholds,
    Transition,
    _enum,
    duration_to_proto,
    thresholds_to_proto,
    timestamp_to_proto,
)

DEFAULT_TIMEOUT = 10.0


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class Client:
    """A connection to one vitals server.

    >>> with Client("127.0.0.1:50051") as vitals:
    ...     vitals.submit_run("checkout", "http", "healthy")
    ...     with vitals.lock("nightly-report") as grant:
    ...         write_report(fencing_token=grant.fencing_token)

    `target` is a gRPC target (`host:port`, `dns:///host:port`, ...). Pass
    `channel` to use a channel you built yourself (interceptors, other
    credentials); the client then does not close it.

    TLS: `root_certificates` (PEM bytes of the CA that issued the server's
    certificate; `tls=True` alone trusts the system's CAs) and, for mTLS,
    `private_key` and `certificate_chain` (PEM bytes). `server_name`
    overrides the name the server's certificate must carry. `token` is sent
    as `authorization: Bearer <token>` on every call.
    """

    def __init__(
        self,
        target: Optional[str] = None,
        *,
        channel: Optional[grpc.Channel] = None,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        options: Sequence[tuple[str, object]] = (),
        tls: bool = False,
        root_certificates: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        server_name: Optional[str] = None,
        token: Optional[str] = None,
    ) -> None:
        if (target is None) == (channel is None):
            raise ValueError("pass either target or channel")
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("pass private_key and certificate_chain together")
        self._owns_channel = channel is None
        if channel is None:
            options = list(options)
            if tls or root_certificates is not None or certificate_chain is not None:
                if server_name is not None:
                    options.append(("grpc.ssl_target_name_override", server_name))
                credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
                channel = grpc.secure_channel(target, credentials, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        self._raw_channel = channel
        if token is not None:
            # An interceptor rather than call credentials: those are refused
            # on a plaintext channel, and a token without TLS is legitimate
            # on loopback or behind a mesh that encrypts.
            channel = grpc.intercept_channel(channel, _BearerToken(token))
        self._channel = channel
        self._health = health_pb2_grpc.HealthCheckServiceStub(self._channel)
        self._locks = lock_pb2_grpc.LockServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        if self._owns_channel:
            self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request, timeout: Optional[float]):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    # ------------------------------------------------------------- health

    def evaluate_health(
        self,
        statuses: Iterable[StatusLike],
        thresholds: Optional[Thresholds] = None,
        *,
        timeout: Optional[float] = None,
    ) -> EvaluationResult:
        """Evaluates run statuses (newest first) without storing anything."""
        request = pb.EvaluateHealthRequest(statuses=[HealthStatus.parse(s) for s in statuses])
        if thresholds is not None:
            request.thresholds.CopyFrom(thresholds_to_proto(thresholds))
        response = self._unary(self._health.EvaluateHealth, request, timeout)
        return EvaluationResult(_enum(HealthStatus, response.status), Evaluation.from_proto(response.evaluation))

    def submit_run(
        self,
        system_id: str,
        check_id: str,
        status: StatusLike,
        run_id: Optional[str] = None,
        observed_at: Optional[datetime] = None,
        latency: Optional[timedelta | float] = None,
        message: str = "",
        *,
        timeout: Optional[float] = None,
    ) -> SubmitRunResult:
        """Records one run. With a `run_id` the call is idempotent: a retry
        stores nothing and reports `duplicate=True`."""
        request = pb.SubmitRunRequest(
            run_id=run_id or "",
            system_id=system_id,
            check_id=check_id,
            status=HealthStatus.parse(status),
            message=message,
        )
        if observed_at is not None:
            request.observed_at.CopyFrom(timestamp_to_proto(observed_at))
        if latency is not None:
            request.latency.CopyFrom(duration_to_proto(latency))
        r = self._unary(self._health.SubmitRun, request, timeout)
        return SubmitRunResult(
            run=Run.from_proto(r.run),
            system_health=SystemHealth.from_proto(r.system_health),
            transition=Transition.from_proto(r.transition) if r.HasField("transition") else None,
            duplicate=r.duplicate,
        )

    def get_system_health(self, system_id: str, *, timeout: Optional[float] = None) -> SystemHealth:
        """The stored health of a system; raises SystemNotFound for an unknown one."""
        r = self._unary(self._health.GetSystemHealth, pb.GetSystemHealthRequest(system_id=system_id), timeout)
        return SystemHealth.from_proto(r.system_health)

    def configure_check(
        self,
        system_id: str,
        check_id: str,
        thresholds: Optional[Thresholds] = None,
        enabled: Optional[bool] = None,
        flapping: Optional[FlappingSettings | bool] = None,
        *,
        timeout: Optional[float] = None,
    ) -> ConfigureCheckResult:
        """Creates or updates a check. None leaves a setting as it is (the
        defaults for a new check). `flapping`: FlappingSettings turn flapping
        detection on, False turns it off."""
        request = pb.ConfigureCheckRequest(system_id=system_id, check_id=check_id)
        if thresholds is not None:
            request.thresholds.CopyFrom(thresholds_to_proto(thresholds))
        if enabled is not None:
            request.enabled = enabled
        if flapping is False:
            request.flapping.CopyFrom(pb.FlappingSettings())
        elif isinstance(flapping, FlappingSettings):
            request.flapping.CopyFrom(flapping.to_proto())
        elif flapping is not None:
            raise TypeError("flapping must be FlappingSettings, False or None")
        r = self._unary(self._health.ConfigureCheck, request, timeout)
        return ConfigureCheckResult(
            check=CheckHealth.from_proto(r.check),
            system_health=SystemHealth.from_proto(r.system_health),
            transition=Transition.from_proto(r.transition) if r.HasField("transition") else None,
        )

    def list_runs(
        self,
        system_id: str,
        check_id: Optional[str] = None,
        *,
        page_size: int = 0,
        timeout: Optional[float] = None,
    ) -> Iterator[Run]:
        """Every run of a system (or of one check), newest first, fetching
        pages of `page_size` (0: the server's default) as it goes."""
        token = ""
        while True:
            request = pb.ListRunsRequest(
                system_id=system_id, check_id=check_id or "", page_size=page_size, page_token=token
            )
            r = self._unary(self._health.ListRuns, request, timeout)
            yield from (Run.from_proto(m) for m in r.runs)
            token = r.next_page_token
            if not token:
                return

    def list_transitions(
        self,
        system_id: Optional[str] = None,
        *,
        page_size: int = 0,
        timeout: Optional[float] = None,
    ) -> Iterator[Transition]:
        """Every stored transition (of one system, when given), highest
        sequence first, fetching pages as it goes."""
        token = ""
        while True:
            request = pb.ListTransitionsRequest(system_id=system_id or "", page_size=page_size, page_token=token)
            r = self._unary(self._health.ListTransitions, request, timeout)
            yield from (Transition.from_proto(m) for m in r.transitions)
            token = r.next_page_token
            if not token:
                return

    def watch_transitions(
        self,
        system_id: Optional[str] = None,
        after_sequence: int = 0,
        *,
        exclude_maintenance: bool = False,
        exclude_flapping: bool = False,
        timeout: Optional[float] = None,
    ) -> TransitionWatch:
        """Follows transitions (of one system, when given): first the stored
        ones after `after_sequence`, then new ones as they commit, in sequence
        order. Iterate it; `cancel()` (from any thread) or leaving its `with`
        block ends it. `timeout` is a deadline for the whole stream.
        `exclude_maintenance` / `exclude_flapping` leave out transitions so
        marked (a recovery of a problem the watcher was shown never is)."""
        request = pb.WatchTransitionsRequest(
            system_id=system_id or "",
            after_sequence=after_sequence,
            exclude_maintenance=exclude_maintenance,
            exclude_flapping=exclude_flapping,
        )
        return TransitionWatch(self._health.WatchTransitions(request, timeout=timeout))

    def list_systems(
        self,
        status: Optional[StatusLike] = None,
        prefix: str = "",
        *,
        page_size: int = 0,
        timeout: Optional[float] = None,
    ) -> Iterator[SystemSummary]:
        """Every stored system (with `status`, whose id starts with
        `prefix`), in byte order of their ids, fetching pages as it goes."""
        token = ""
        while True:
            request = pb.ListSystemsRequest(
                status=HealthStatus.parse(status) if status is not None else 0,
                system_id_prefix=prefix,
                page_size=page_size,
                page_token=token,
            )
            r = self._unary(self._health.ListSystems, request, timeout)
            yield from (SystemSummary.from_proto(m) for m in r.systems)
            token = r.next_page_token
            if not token:
                return

    def delete_check(self, system_id: str, check_id: str, *, timeout: Optional[float] = None) -> DeleteCheckResult:
        """Deletes a check and its runs and re-evaluates its system. Deleting
        what is gone is no error (`deleted=False`)."""
        r = self._unary(
            self._health.DeleteCheck, pb.DeleteCheckRequest(system_id=system_id, check_id=check_id), timeout
        )
        return DeleteCheckResult(
            deleted=r.deleted,
            system_health=SystemHealth.from_proto(r.system_health) if r.HasField("system_health") else None,
            transition=Transition.from_proto(r.transition) if r.HasField("transition") else None,
        )

    def delete_system(self, system_id: str, *, timeout: Optional[float] = None) -> bool:
        """Deletes a system (its transitions stay); False when there was none."""
        r = self._unary(self._health.DeleteSystem, pb.DeleteSystemRequest(system_id=system_id), timeout)
        return r.deleted

    def set_maintenance(
        self,
        system_id: str,
        ends_at: datetime,
        starts_at: Optional[datetime] = None,
        reason: str = "",
        *,
        timeout: Optional[float] = None,
    ) -> SetMaintenanceResult:
        """Schedules a maintenance window (from now when `starts_at` is None);
        one it overlaps or touches is merged with it."""
        request = pb.SetMaintenanceRequest(system_id=system_id, reason=reason)
        request.ends_at.CopyFrom(timestamp_to_proto(ends_at))
        if starts_at is not None:
            request.starts_at.CopyFrom(timestamp_to_proto(starts_at))
        r = self._unary(self._health.SetMaintenance, request, timeout)
        return SetMaintenanceResult(
            window=MaintenanceWindow.from_proto(r.window), system_health=SystemHealth.from_proto(r.system_health)
        )

    def clear_maintenance(self, system_id: str, *, timeout: Optional[float] = None) -> ClearMaintenanceResult:
        """Ends the open maintenance window now and removes upcoming ones."""
        r = self._unary(self._health.ClearMaintenance, pb.ClearMaintenanceRequest(system_id=system_id), timeout)
        return ClearMaintenanceResult(
            cleared=r.cleared,
            system_health=SystemHealth.from_proto(r.system_health) if r.HasField("system_health") else None,
        )

    def get_uptime(self, system_id: str, window: timedelta | float, *, timeout: Optional[float] = None) -> Uptime:
        """The system's time per status over `window` ending now (capped at
        the 90 days transitions are kept)."""
        request = pb.GetUptimeRequest(system_id=system_id)
        request.window.CopyFrom(duration_to_proto(window))
        return Uptime.from_proto(self._unary(self._health.GetUptime, request, timeout))

    def configure_system(
        self, system_id: str, depends_on: Iterable[str], *, timeout: Optional[float] = None
    ) -> SystemHealth:
        """Sets what a system depends on (replacing the list); a cycle raises
        InvalidArgument naming `depends_on`."""
        request = pb.ConfigureSystemRequest(system_id=system_id, depends_on=list(depends_on))
        r = self._unary(self._health.ConfigureSystem, request, timeout)
        return SystemHealth.from_proto(r.system_health)

    # -------------------------------------------------------------- locks

    def lock(
        self,
        key: str,
        wait_timeout: Optional[timedelta | float] = None,
        owner: str = "",
        *,
        keepalive_interval: Optional[timedelta | float] = None,
    ) -> Lock:
        """A distributed lock, held for the duration of a `with` block:

        >>> with client.lock("reindex", wait_timeout=5) as grant:
        ...     reindex(fencing_token=grant.fencing_token)

        `wait_timeout`: None waits up to the server's default, 0 tries once,
        otherwise seconds or a timedelta; LockNotAvailable when not granted.
        Keep-alives go out in the background every third of the lease
        (`keepalive_interval` overrides; 0 disables them). Leaving the block
        releases the lock; LockLost is raised there if it was lost meanwhile.
        """
        return Lock(self._locks, key, wait_timeout, owner, keepalive_interval)

    def shared_lock(
        self,
        key: str,
        wait_timeout: Optional[timedelta | float] = None,
        owner: str = "",
        *,
        keepalive_interval: Optional[timedelta | float] = None,
    ) -> Lock:
        """`lock`, held shared: with any number of other shared holders of
        `key`, never with an exclusive one. A shared acquirer that arrives
        while an exclusive one waits waits behind it."""
        return Lock(
            self._locks, key, wait_timeout, owner, keepalive_interval, mode=lock_pb2.LOCK_MODE_SHARED
        )

    def semaphore(
        self,
        key: str,
        max_holders: int,
        wait_timeout: Optional[timedelta | float] = None,
        owner: str = "",
        *,
        keepalive_interval: Optional[timedelta | float] = None,
    ) -> Lock:
        """`lock` of a semaphore: at most `max_holders` (2 to 256) holders of
        `key` at once, each with its own fencing token. Every acquirer of the
        key must name the same `max_holders` (else LockModeMismatch)."""
        return Lock(self._locks, key, wait_timeout, owner, keepalive_interval, max_holders=max_holders)

    def campaign(
        self,
        election: str,
        value: str,
        wait_timeout: Optional[timedelta | float] = None,
        *,
        keepalive_interval: Optional[timedelta | float] = None,
    ) -> Campaign:
        """Leadership of `election`, held for the duration of a `with` block
        like `lock` (the grant's fencing token orders the leaders):

        >>> with client.campaign("scheduler", "host-a:8080") as leadership:
        ...     lead(fencing_token=leadership.fencing_token)
        """
        return Campaign(self._locks, election, wait_timeout, value, keepalive_interval)

    def observe(self, election: str, after_token: int = 0, *, timeout: Optional[float] = None) -> LeaderWatch:
        """Follows the leaders of `election`: the current one, then each new
        one, once each, in order, never one whose lease has ended. Iterate
        it; `cancel()` or leaving its `with` block ends it. Resume with
        `after_token=watch.last_token`."""
        request = lock_pb2.ObserveLeaderRequest(election=election, after_token=after_token)
        return LeaderWatch(self._locks.ObserveLeader(request, timeout=timeout), after_token)


class TransitionWatch:
    """An iterator of transitions over one WatchTransitions stream."""

    def __init__(self, call) -> None:
        self._call = call
        self._cancelled = threading.Event()

    def __iter__(self) -> TransitionWatch:
        return self

    def __next__(self) -> Transition:
        try:
            response = next(self._call)
        except grpc.RpcError as err:
            if self._cancelled.is_set() and err.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(err) from None
        return Transition.from_proto(response.transition)

    def cancel(self) -> None:
        """Ends the stream; a blocked `next()` then stops the iteration."""
        self._cancelled.set()
        self._call.cancel()

    def __enter__(self) -> TransitionWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


__all__ = ["Client", "TransitionWatch", "VitalsError"]
