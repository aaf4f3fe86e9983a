-- SubmitRun evaluates a check from state the check keeps, instead of reading
-- its newest runs from the runs table, which stays the history (ListRuns,
-- retention): written, not read, when a run is submitted.

-- The runs evaluation reads: the check's newest 100, newest first by
-- observed_at, then by run_id in byte order, encoded by the store
-- (src/store/codec.rs) as "<observed_at in µs>\x1f<status>\x1f<run_id>" per
-- run, joined by \x1e. Run ids hold no control characters.
ALTER TABLE checks ADD COLUMN run_window text NOT NULL DEFAULT '';
-- A window is rewritten by every run of its check and is a few KiB (run ids
-- are most of it): kept in the row uncompressed up to the 8 KiB a row may
-- take. Compressing it on every write, or moving it to the TOAST table, cost
-- PostgreSQL more than the rest of the write.
ALTER TABLE checks SET (toast_tuple_target = 8160);
ALTER TABLE checks ALTER COLUMN run_window SET STORAGE MAIN;

-- Each write of a system (a run, a configuration change) increments its
-- version. A write reads the system without locking it and is applied only if
-- the version is still the one it read, so it can never be based on a state
-- that another write replaced meanwhile, even if the system's lock was lost:
-- a write that finds another version sets 0, which the constraint refuses,
-- undoing the whole write.
ALTER TABLE systems ADD COLUMN version bigint NOT NULL DEFAULT 1
    CONSTRAINT systems_stale_write CHECK (version > 0);

-- The newest transition sequence handed out. A write that records a
-- transition increments it in the statement that inserts the transition and
-- holds its row lock until that commits, so the next one is drawn only after
-- it: sequences are gap-free and become visible in order.
CREATE TABLE transition_sequence (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last     bigint NOT NULL
);
INSERT INTO transition_sequence (last) SELECT coalesce(max(sequence), 0) FROM transitions;

-- Run ids compare byte by byte whatever the database's collation, as in a
-- window and in the embedded store, so that ListRuns' pages, a window's runs
-- observed in the same microsecond and retention's newest 100 of a check are
-- in one order on every backend. Only the collation changes: the table is
-- not rewritten, its indexes on run_id are rebuilt.
ALTER TABLE runs ALTER COLUMN run_id TYPE text COLLATE "C";

-- The windows of existing checks, from their runs: each check's newest 100,
-- read in the window's order through runs_by_check (rebuilt above with run
-- ids in byte order), so a check's older runs are not read.
UPDATE checks c SET run_window = w.encoded
FROM (
    SELECT k.system_id, k.check_id,
           string_agg(
               round(extract(epoch FROM r.observed_at) * 1000000)::bigint::text
                   || E'\x1f' || r.status::text || E'\x1f' || r.run_id,
               E'\x1e' ORDER BY r.observed_at DESC, r.run_id DESC) AS encoded
    FROM checks k
    CROSS JOIN LATERAL (
        SELECT n.observed_at, n.status, n.run_id FROM runs n
        WHERE n.system_id = k.system_id AND n.check_id = k.check_id
        ORDER BY n.observed_at DESC, n.run_id DESC
        LIMIT 100) r
    GROUP BY k.system_id, k.check_id) w
WHERE c.system_id = w.system_id AND c.check_id = w.check_id;
