-- A run id is an idempotency key within its system, no longer across all of
-- them: a caller that may write one system can no longer take an id another
-- system's checker will use, which that checker would then be refused
-- (RUN_ID_CONFLICT). The same id in two systems is two runs.
--
-- SQLite cannot change a table's key in place: the runs move to a table with
-- the new key, which takes the old one's name and indexes.
CREATE TABLE runs_keyed_by_system (
    run_id      TEXT NOT NULL,
    system_id   TEXT NOT NULL,
    check_id    TEXT NOT NULL,
    status      INTEGER NOT NULL,
    observed_at INTEGER NOT NULL,
    latency_us  INTEGER,
    message     TEXT NOT NULL DEFAULT '',
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (system_id, run_id)
);
INSERT INTO runs_keyed_by_system
    (run_id, system_id, check_id, status, observed_at, latency_us, message, recorded_at)
SELECT run_id, system_id, check_id, status, observed_at, latency_us, message, recorded_at FROM runs;
DROP TABLE runs;
ALTER TABLE runs_keyed_by_system RENAME TO runs;
CREATE INDEX runs_by_check ON runs (system_id, check_id, observed_at DESC, run_id DESC);
CREATE INDEX runs_by_system ON runs (system_id, observed_at DESC, run_id DESC);

-- A duplicate's reply names the transition its run caused, found by the
-- run's system and id.
DROP INDEX transitions_by_run;
CREATE INDEX transitions_by_run ON transitions (system_id, run_id) WHERE run_id IS NOT NULL;
