"""Listing, deleting, maintenance, uptime, flapping and dependencies through
the Python client, against a real vitals."""

from datetime import datetime, timedelta, timezone

import pytest

from vitals_client import (
    Consecutive,
    FlappingSettings,
    HealthStatus,
    InvalidArgument,
    SystemNotFound,
)

H, D, U = HealthStatus.HEALTHY, HealthStatus.DEGRADED, HealthStatus.UNHEALTHY
# One failure degrades, two make unhealthy, one success recovers.
SENSITIVE = Consecutive(1, 1, 2)


def now() -> datetime:
    return datetime.now(timezone.utc)


def test_list_systems_filters_by_prefix_and_status_across_pages(client, system_id):
    for suffix, status in [("a", H), ("b", U), ("c", H)]:
        client.configure_check(f"{system_id}-{suffix}", "http", SENSITIVE)
        client.submit_run(f"{system_id}-{suffix}", "http", status)
    every = list(client.list_systems(prefix=system_id, page_size=1))
    assert [s.system_id for s in every] == [f"{system_id}-a", f"{system_id}-b", f"{system_id}-c"]
    assert every[0].check_count == 1 and every[0].last_run_at is not None
    degraded = list(client.list_systems(D, prefix=system_id))
    assert [s.system_id for s in degraded] == [f"{system_id}-b"]


def test_deleting_the_failing_check_recovers_the_system_and_a_second_delete_is_harmless(client, system_id):
    client.configure_check(system_id, "disk", SENSITIVE)
    client.submit_run(system_id, "http", "healthy")
    client.submit_run(system_id, "disk", "unhealthy")
    result = client.delete_check(system_id, "disk")
    assert result.deleted
    assert result.system_health.status == H
    assert result.transition.check_deleted and result.transition.to_status == H
    again = client.delete_check(system_id, "disk")
    assert not again.deleted and again.transition is None
    assert client.delete_system(system_id)
    assert not client.delete_system(system_id)
    with pytest.raises(SystemNotFound):
        client.get_system_health(system_id)


def test_a_transition_in_a_maintenance_window_is_marked_and_clearing_ends_the_window(client, system_id):
    client.configure_check(system_id, "http", SENSITIVE)
    set_ = client.set_maintenance(system_id, now() + timedelta(hours=1), now() - timedelta(minutes=1), "upgrade")
    assert set_.window.reason == "upgrade"
    assert set_.system_health.in_maintenance
    result = client.submit_run(system_id, "http", "unhealthy")
    assert result.transition.in_maintenance
    cleared = client.clear_maintenance(system_id)
    assert cleared.cleared == 1
    assert not cleared.system_health.in_maintenance
    with pytest.raises(InvalidArgument) as raised:
        client.set_maintenance(system_id, now() - timedelta(minutes=1))
    assert {v.field for v in raised.value.violations} == {"ends_at"}


def test_uptime_splits_the_window_and_refuses_an_unknown_system(client, system_id):
    client.submit_run(system_id, "http", "healthy")
    uptime = client.get_uptime(system_id, timedelta(days=1))
    assert uptime.window_end - uptime.window_start == timedelta(days=1)
    assert uptime.counted_from >= uptime.window_start
    assert uptime.healthy_percent == pytest.approx(100.0)
    assert uptime.unhealthy == timedelta(0)
    with pytest.raises(SystemNotFound):
        client.get_uptime(f"{system_id}-never", 60)


def test_a_check_flaps_once_its_runs_keep_changing_and_detection_can_be_turned_off(client, system_id):
    settings = FlappingSettings(runs=10, start_changes=3, stop_changes=2)
    configured = client.configure_check(system_id, "http", SENSITIVE, flapping=settings)
    assert configured.check.flapping_settings == settings
    for status in [H, U, H, U]:
        result = client.submit_run(system_id, "http", status)
    assert result.system_health.check("http").flapping
    assert result.transition.flapping
    off = client.configure_check(system_id, "http", flapping=False)
    assert off.check.flapping_settings is None and not off.check.flapping


def test_an_outage_names_the_dependency_already_down_and_a_cycle_is_refused(client, system_id):
    api, db = f"{system_id}-api", f"{system_id}-db"
    for s in (api, db):
        client.configure_check(s, "http", SENSITIVE)
    assert client.configure_system(api, [db]).depends_on == (db,)
    client.submit_run(db, "http", "unhealthy")
    outage = client.submit_run(api, "http", "unhealthy").transition
    assert outage.caused_by == (db,)
    with pytest.raises(InvalidArgument) as raised:
        client.configure_system(db, [api])
    assert [v.field for v in raised.value.violations] == ["depends_on"]
