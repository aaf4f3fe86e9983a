-- The embedded (SQLite) store of vitals: the same tables as the PostgreSQL
-- store, for a single replica.
-- Statuses are the proto enum numbers: 1 healthy, 2 degraded, 3 unhealthy.
-- Times are INTEGER microseconds since the Unix epoch (UTC): exact, and they
-- order correctly, which SQLite's text dates do not guarantee.

CREATE TABLE systems (
    system_id    TEXT PRIMARY KEY NOT NULL,
    status       INTEGER NOT NULL,
    evaluated_at INTEGER NOT NULL
);

CREATE TABLE checks (
    system_id       TEXT NOT NULL,
    check_id        TEXT NOT NULL,
    -- thresholds, encoded by the store ("c:1:2:5" or "w:10:3:7")
    thresholds      TEXT NOT NULL,
    enabled         INTEGER NOT NULL DEFAULT 1,
    status          INTEGER NOT NULL DEFAULT 1,
    -- the last evaluation, encoded by the store
    evaluation      TEXT NOT NULL DEFAULT '',
    runs_considered INTEGER NOT NULL DEFAULT 0,
    last_run_at     INTEGER,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (system_id, check_id)
);

CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY NOT NULL,
    system_id   TEXT NOT NULL,
    check_id    TEXT NOT NULL,
    status      INTEGER NOT NULL,
    observed_at INTEGER NOT NULL,
    latency_us  INTEGER,
    message     TEXT NOT NULL DEFAULT '',
    recorded_at INTEGER NOT NULL
);

-- Evaluation reads a check's newest runs; ListRuns pages a system's or a check's runs.
CREATE INDEX runs_by_check ON runs (system_id, check_id, observed_at DESC, run_id DESC);
CREATE INDEX runs_by_system ON runs (system_id, observed_at DESC, run_id DESC);
-- Retention scans old runs.
CREATE INDEX runs_by_age ON runs (observed_at);

CREATE TABLE transitions (
    -- max + 1 inside the single write transaction: SQLite has one writer at a
    -- time, so sequences commit in order and a resuming watcher misses none.
    sequence        INTEGER PRIMARY KEY NOT NULL,
    system_id       TEXT NOT NULL,
    check_id        TEXT NOT NULL,
    from_status     INTEGER NOT NULL,
    to_status       INTEGER NOT NULL,
    transitioned_at INTEGER NOT NULL,
    evaluation      TEXT NOT NULL
);

CREATE INDEX transitions_by_system ON transitions (system_id, sequence);
CREATE INDEX transitions_by_age ON transitions (transitioned_at);

-- Fencing tokens for WithLock are handed out from blocks reserved here
-- (hi-lo): a process reserves the next block before it hands out its first
-- token, so tokens never go backwards across restarts, even after a crash.
CREATE TABLE fencing_tokens (
    id               INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    reserved_through INTEGER NOT NULL
);
INSERT INTO fencing_tokens (id, reserved_through) VALUES (1, 0);
