-- Finding, retiring, silencing, measuring and calming systems: the columns
-- and tables behind ListSystems, DeleteCheck/DeleteSystem, maintenance
-- windows, uptime, flapping and dependencies.

-- ListSystems pages systems in byte order of their ids, as the embedded
-- store does, whatever the database's collation.
CREATE INDEX systems_by_id_bytes ON systems (system_id COLLATE "C");

-- When the system was first written: uptime counts no time before it. For
-- systems that existed before this column, the oldest thing known of them.
ALTER TABLE systems ADD COLUMN created_at timestamptz;
UPDATE systems s SET created_at = least(
    s.evaluated_at,
    (SELECT min(t.transitioned_at) FROM transitions t WHERE t.system_id = s.system_id));
ALTER TABLE systems ALTER COLUMN created_at SET DEFAULT now();
ALTER TABLE systems ALTER COLUMN created_at SET NOT NULL;

-- The status a notifier that hides maintenance and flapping transitions last
-- saw: the to_status of the system's newest transition that carried neither
-- flag. A recovery to healthy from a status announced as non-healthy is
-- never hidden, so whoever saw the problem sees it resolved.
ALTER TABLE systems ADD COLUMN announced_status smallint NOT NULL DEFAULT 1;
UPDATE systems SET announced_status = status;

-- Flapping detection of a check: "" when off, else encoded by the store
-- ("f:<runs>:<start>:<stop>"); whether it flaps now.
ALTER TABLE checks ADD COLUMN flapping_settings text NOT NULL DEFAULT '';
ALTER TABLE checks ADD COLUMN flapping boolean NOT NULL DEFAULT false;

-- What a notifier needs to stay quiet: the transition was written during a
-- maintenance window, while its check flapped, while dependencies (ids
-- joined by \x1f, which ids cannot hold) were already non-healthy, or by
-- deleting its check.
ALTER TABLE transitions ADD COLUMN in_maintenance boolean NOT NULL DEFAULT false;
ALTER TABLE transitions ADD COLUMN flapping boolean NOT NULL DEFAULT false;
ALTER TABLE transitions ADD COLUMN caused_by text NOT NULL DEFAULT '';
ALTER TABLE transitions ADD COLUMN check_deleted boolean NOT NULL DEFAULT false;

-- Maintenance windows, past ones kept (as transitions are) for uptime.
-- Overlapping windows of a system are merged when set, so they never overlap.
CREATE TABLE maintenance_windows (
    system_id text NOT NULL,
    starts_at timestamptz NOT NULL,
    ends_at   timestamptz NOT NULL CHECK (ends_at > starts_at),
    reason    text NOT NULL DEFAULT '',
    PRIMARY KEY (system_id, starts_at)
);
CREATE INDEX maintenance_windows_by_end ON maintenance_windows (system_id, ends_at);

-- What each system depends on (ConfigureSystem); never a cycle.
CREATE TABLE system_dependencies (
    system_id  text NOT NULL,
    depends_on text NOT NULL,
    PRIMARY KEY (system_id, depends_on)
);
