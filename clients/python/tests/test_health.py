"""HealthCheckService through the Python client, against a real vitals."""

import threading
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from vitals_client import (
    Consecutive,
    EvaluationMode,
    EvaluationRule,
    HealthStatus,
    InvalidArgument,
    RunIdConflict,
    SystemNotFound,
    VitalsError,
    Window,
)

H, D, U = HealthStatus.HEALTHY, HealthStatus.DEGRADED, HealthStatus.UNHEALTHY

# With the default consecutive thresholds: 2 failures in a row degrade a
# check, 5 make it unhealthy, 1 success recovers it.
DEGRADING, WORSENING, RECOVERING = [U, U], [U, U, U], [H]


# ------------------------------------------------------------ EvaluateHealth


def test_evaluating_no_runs_is_healthy_by_the_no_runs_rule(client):
    result = client.evaluate_health([])
    assert result.status == H
    assert result.evaluation.rule == EvaluationRule.NO_RUNS
    assert result.evaluation.mode == EvaluationMode.CONSECUTIVE
    assert result.evaluation.thresholds == Consecutive()


def test_two_failures_in_a_row_reach_the_default_degraded_threshold(client):
    result = client.evaluate_health(["unhealthy", "HEALTH_STATUS_DEGRADED", "healthy"])
    assert result.status == D
    assert result.evaluation.rule == EvaluationRule.DEGRADED_THRESHOLD_REACHED
    assert result.evaluation.leading_failure_streak == 2


def test_window_thresholds_count_failures_anywhere_in_the_window(client):
    window = Window(window_size=5, degraded_min_failure_count=2, unhealthy_min_failure_count=4)
    result = client.evaluate_health([H, U, H, U, U, H, H], window)
    assert result.status == D
    assert result.evaluation.mode == EvaluationMode.WINDOW
    assert result.evaluation.runs_considered == 5
    assert result.evaluation.failures_in_window == 3
    assert result.evaluation.thresholds == window


def test_invalid_thresholds_report_every_violated_field(client):
    with pytest.raises(InvalidArgument) as raised:
        client.evaluate_health([H], Window(window_size=2, degraded_min_failure_count=0))
    err = raised.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_ARGUMENT"
    assert err.domain == "vitals.dev"
    assert {v.field for v in err.violations} == {
        "thresholds.window.window_size",
        "thresholds.window.degraded_min_failure_count",
    }
    assert not err.retryable


def test_an_unknown_status_name_is_refused_before_sending(client):
    with pytest.raises(ValueError, match="unknown health status"):
        client.evaluate_health(["fine"])


# -------------------------------------------------------- SubmitRun and reads


def test_a_submitted_run_is_stored_with_every_field(new_id, client, system_id):
    observed = datetime.now(timezone.utc).replace(microsecond=123000) - timedelta(seconds=30)
    result = client.submit_run(
        system_id, "http", "healthy", run_id=new_id("run"), observed_at=observed, latency=0.25, message="200 OK"
    )
    run = result.run
    assert (run.system_id, run.check_id, run.status) == (system_id, "http", H)
    assert run.observed_at == observed
    assert run.latency == timedelta(milliseconds=250)
    assert run.message == "200 OK"
    assert run.recorded_at is not None and run.recorded_at >= observed
    assert not result.duplicate
    assert result.transition is None  # a new system starts healthy
    assert result.system_health.status == H
    assert result.system_health.check("http").runs_considered == 1


def test_a_run_without_run_id_gets_one_from_the_server(client, system_id):
    first = client.submit_run(system_id, "http", H)
    second = client.submit_run(system_id, "http", H)
    assert first.run.run_id and second.run.run_id
    assert first.run.run_id != second.run.run_id


def test_resubmitting_a_run_id_is_a_duplicate_and_other_content_a_conflict(new_id, client, system_id):
    run_id = new_id("run")
    observed = datetime.now(timezone.utc) - timedelta(seconds=5)
    first = client.submit_run(system_id, "http", U, run_id=run_id, observed_at=observed)
    again = client.submit_run(system_id, "http", U, run_id=run_id, observed_at=observed)
    assert not first.duplicate and again.duplicate
    assert again.run.run_id == run_id
    with pytest.raises(RunIdConflict) as raised:
        client.submit_run(system_id, "http", H, run_id=run_id, observed_at=observed)
    assert raised.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert raised.value.metadata == {"run_id": run_id}


def test_a_naive_observed_at_is_refused_as_ambiguous(client, system_id):
    with pytest.raises(ValueError, match="timezone-aware"):
        client.submit_run(system_id, "http", H, observed_at=datetime.now())


def test_get_system_health_returns_every_check_by_check_id(client, system_id):
    for check in ("tcp", "http", "dns"):
        client.submit_run(system_id, check, H)
    for status in DEGRADING:
        client.submit_run(system_id, "tcp", status)
    health = client.get_system_health(system_id)
    assert health.system_id == system_id
    assert health.status == D
    assert [c.check_id for c in health.checks] == ["dns", "http", "tcp"]
    assert health.check("tcp").status == D
    assert health.check("tcp").evaluation.rule == EvaluationRule.DEGRADED_THRESHOLD_REACHED
    assert health.check("dns").last_run_at is not None
    assert health.evaluated_at is not None


def test_an_unknown_system_is_not_found_with_its_id_in_the_error(new_id, client):
    missing = new_id("py-missing")
    with pytest.raises(SystemNotFound) as raised:
        client.get_system_health(missing)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert raised.value.reason == "SYSTEM_NOT_FOUND"
    assert raised.value.metadata == {"system_id": missing}


def test_list_runs_iterates_every_page_newest_first(new_id, client, system_id):
    start = datetime.now(timezone.utc) - timedelta(minutes=10)
    submitted = []
    for i in range(7):
        check = "http" if i % 2 == 0 else "tcp"
        run = client.submit_run(system_id, check, H, observed_at=start + timedelta(seconds=i)).run
        submitted.append(run.run_id)
    every = list(client.list_runs(system_id, page_size=3))
    assert [r.run_id for r in every] == submitted[::-1]
    only_http = list(client.list_runs(system_id, check_id="http", page_size=2))
    assert [r.run_id for r in only_http] == submitted[::-2]
    assert list(client.list_runs(new_id("py-empty"))) == []


def test_a_bad_page_size_is_an_invalid_argument(client, system_id):
    with pytest.raises(InvalidArgument) as raised:
        list(client.list_runs(system_id, page_size=5000))
    assert [v.field for v in raised.value.violations] == ["page_size"]


# ------------------------------------------------------------ ConfigureCheck


def test_configure_check_sets_thresholds_and_reevaluates(client, system_id):
    for status in [U, U]:
        client.submit_run(system_id, "http", status)
    strict = Consecutive(healthy_min_success_count=2, degraded_min_failure_count=1, unhealthy_min_failure_count=2)
    result = client.configure_check(system_id, "http", thresholds=strict)
    assert result.check.thresholds == strict
    assert result.check.enabled
    assert result.check.status == U
    assert result.system_health.status == U
    assert result.transition is not None
    assert (result.transition.from_status, result.transition.to_status) == (D, U)


def test_a_disabled_check_stops_counting_towards_the_system(client, system_id):
    client.submit_run(system_id, "http", H)
    for status in DEGRADING:
        client.submit_run(system_id, "tcp", status)
    paused = client.configure_check(system_id, "tcp", enabled=False)
    assert not paused.check.enabled
    assert paused.system_health.status == H
    assert paused.transition is not None and paused.transition.to_status == H
    resumed = client.configure_check(system_id, "tcp", enabled=True)
    assert resumed.system_health.status == D


def test_configure_check_creates_a_new_check_with_the_defaults(client, system_id):
    result = client.configure_check(system_id, "new-check")
    assert result.check.thresholds == Consecutive()
    assert result.check.enabled
    assert result.check.runs_considered == 0
    assert result.transition is None


# ------------------------------------------------------ transitions: list and watch


def drive_through_every_status(client, system_id, check_id="http"):
    """Healthy -> degraded -> unhealthy -> healthy: three transitions."""
    for status in DEGRADING + WORSENING + RECOVERING:
        client.submit_run(system_id, check_id, status)


def test_list_transitions_pages_through_a_systems_changes_newest_first(client, system_id):
    drive_through_every_status(client, system_id)
    transitions = list(client.list_transitions(system_id, page_size=2))
    assert [(t.from_status, t.to_status) for t in transitions] == [(U, H), (D, U), (H, D)]
    sequences = [t.sequence for t in transitions]
    assert sequences == sorted(sequences, reverse=True)
    assert all(t.system_id == system_id and t.check_id == "http" for t in transitions)
    everyone = {t.sequence for t in client.list_transitions(page_size=1000)}
    assert set(sequences) <= everyone


def test_a_watcher_receives_the_transitions_as_runs_cross_thresholds(new_id, client, other_client, system_id):
    noise = new_id("py-noise")
    for status in DEGRADING:
        client.submit_run(system_id, "http", status)
    with other_client.watch_transitions(system_id, timeout=30) as watch:
        replayed = next(watch)  # stored before the watch began
        assert (replayed.from_status, replayed.to_status) == (H, D)
        # From here on the watcher follows new commits.
        for status in DEGRADING:  # another system's transitions stay out of this watch
            client.submit_run(noise, "http", status)
        for status in WORSENING + RECOVERING:
            client.submit_run(system_id, "http", status)
        worse, recovered = next(watch), next(watch)
    assert (worse.from_status, worse.to_status) == (D, U)
    assert (recovered.from_status, recovered.to_status) == (U, H)
    assert replayed.sequence < worse.sequence < recovered.sequence
    assert {replayed.system_id, worse.system_id, recovered.system_id} == {system_id}
    assert recovered.evaluation.rule == EvaluationRule.RECOVERY_CONFIRMED


def test_a_watcher_resumes_after_the_sequence_it_last_saw(client, system_id):
    drive_through_every_status(client, system_id)
    stored = sorted(client.list_transitions(system_id), key=lambda t: t.sequence)
    with client.watch_transitions(system_id, after_sequence=stored[0].sequence, timeout=30) as watch:
        resumed = [next(watch), next(watch)]
    assert [t.sequence for t in resumed] == [t.sequence for t in stored[1:]]


def test_cancelling_a_watch_from_another_thread_ends_the_iteration(client, system_id):
    watch = client.watch_transitions(system_id, timeout=30)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(watch))
    reader.start()
    client.submit_run(system_id, "http", U)  # no transition yet: the reader keeps waiting
    watch.cancel()
    reader.join(10)
    assert not reader.is_alive()
    assert seen == []


def test_an_invalid_watch_filter_fails_on_the_first_read(client):
    with pytest.raises(InvalidArgument):
        next(client.watch_transitions("x" * 300, timeout=10))


def test_errors_are_vitals_errors_with_the_status_code(client):
    with pytest.raises(VitalsError) as raised:
        client.get_system_health("")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in raised.value.violations] == ["system_id"]
