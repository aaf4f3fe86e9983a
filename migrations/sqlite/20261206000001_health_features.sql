-- Finding, retiring, silencing, measuring and calming systems (see the
-- PostgreSQL migration of the same name for why each column exists).

ALTER TABLE systems ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
UPDATE systems SET created_at = min(
    evaluated_at,
    coalesce((SELECT min(t.transitioned_at) FROM transitions t WHERE t.system_id = systems.system_id),
             evaluated_at));

ALTER TABLE systems ADD COLUMN announced_status INTEGER NOT NULL DEFAULT 1;
UPDATE systems SET announced_status = status;

ALTER TABLE checks ADD COLUMN flapping_settings TEXT NOT NULL DEFAULT '';
ALTER TABLE checks ADD COLUMN flapping INTEGER NOT NULL DEFAULT 0;

ALTER TABLE transitions ADD COLUMN in_maintenance INTEGER NOT NULL DEFAULT 0;
ALTER TABLE transitions ADD COLUMN flapping INTEGER NOT NULL DEFAULT 0;
ALTER TABLE transitions ADD COLUMN caused_by TEXT NOT NULL DEFAULT '';
ALTER TABLE transitions ADD COLUMN check_deleted INTEGER NOT NULL DEFAULT 0;

CREATE TABLE maintenance_windows (
    system_id TEXT NOT NULL,
    starts_at INTEGER NOT NULL,
    ends_at   INTEGER NOT NULL CHECK (ends_at > starts_at),
    reason    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (system_id, starts_at)
);
CREATE INDEX maintenance_windows_by_end ON maintenance_windows (system_id, ends_at);

CREATE TABLE system_dependencies (
    system_id  TEXT NOT NULL,
    depends_on TEXT NOT NULL,
    PRIMARY KEY (system_id, depends_on)
);
