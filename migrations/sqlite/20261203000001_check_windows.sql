-- SubmitRun evaluates a check from state the check keeps, instead of reading
-- its newest runs from the runs table, which stays the history (ListRuns,
-- retention): written, not read, when a run is submitted.

-- The runs evaluation reads: the check's newest 100, newest first by
-- observed_at, then by run_id (byte order), encoded by the store
-- (src/store/codec.rs) as "<observed_at in µs>\x1f<status>\x1f<run_id>" per
-- run, joined by \x1e. Run ids hold no control characters.
ALTER TABLE checks ADD COLUMN run_window TEXT NOT NULL DEFAULT '';

-- Each write of a system increments its version; a write is applied only if
-- the version is still the one it read (see the PostgreSQL migration; here
-- the one writer connection already guarantees it).
ALTER TABLE systems ADD COLUMN version INTEGER NOT NULL DEFAULT 1;

-- The windows of existing checks, from their runs.
WITH ranked AS (
    SELECT system_id, check_id, observed_at, status, run_id,
           row_number() OVER (PARTITION BY system_id, check_id ORDER BY observed_at DESC, run_id DESC) AS n
    FROM runs),
windows AS (
    SELECT system_id, check_id,
           group_concat(observed_at || char(31) || status || char(31) || run_id, char(30)
                        ORDER BY observed_at DESC, run_id DESC) AS encoded
    FROM ranked WHERE n <= 100
    GROUP BY system_id, check_id)
UPDATE checks SET run_window = windows.encoded
FROM windows
WHERE checks.system_id = windows.system_id AND checks.check_id = windows.check_id;
