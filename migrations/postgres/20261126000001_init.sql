-- Checks, runs, per-system health and the transition log of vitals.
-- Statuses are stored as the proto enum numbers: 1 healthy, 2 degraded, 3 unhealthy.

CREATE TABLE systems (
    system_id    text PRIMARY KEY,
    status       smallint NOT NULL,
    evaluated_at timestamptz NOT NULL
);

CREATE TABLE checks (
    system_id       text NOT NULL,
    check_id        text NOT NULL,
    -- thresholds, encoded by the store ("c:1:2:5" or "w:10:3:7")
    thresholds      text NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    status          smallint NOT NULL DEFAULT 1,
    -- the last evaluation, encoded by the store
    evaluation      text NOT NULL DEFAULT '',
    runs_considered integer NOT NULL DEFAULT 0,
    last_run_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (system_id, check_id)
);

CREATE TABLE runs (
    run_id      text PRIMARY KEY,
    system_id   text NOT NULL,
    check_id    text NOT NULL,
    status      smallint NOT NULL,
    observed_at timestamptz NOT NULL,
    latency_us  bigint,
    message     text NOT NULL DEFAULT '',
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Evaluation reads a check's newest runs; ListRuns pages a system's or a check's runs.
CREATE INDEX runs_by_check ON runs (system_id, check_id, observed_at DESC, run_id DESC);
CREATE INDEX runs_by_system ON runs (system_id, observed_at DESC, run_id DESC);
-- Retention scans old runs.
CREATE INDEX runs_by_age ON runs (observed_at);

CREATE TABLE transitions (
    -- Assigned under a transaction-level advisory lock as max + 1, so sequences
    -- become visible in order: a watcher resuming after N never misses one.
    sequence        bigint PRIMARY KEY,
    system_id       text NOT NULL,
    check_id        text NOT NULL,
    from_status     smallint NOT NULL,
    to_status       smallint NOT NULL,
    transitioned_at timestamptz NOT NULL DEFAULT now(),
    evaluation      text NOT NULL
);

CREATE INDEX transitions_by_system ON transitions (system_id, sequence);
CREATE INDEX transitions_by_age ON transitions (transitioned_at);

-- Fencing tokens for WithLock: a sequence never goes backwards, even when the
-- transaction that drew a value rolls back.
CREATE SEQUENCE lock_fencing_tokens AS bigint START 1;
