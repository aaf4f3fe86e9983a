-- A run id is an idempotency key within its system, no longer across all of
-- them: a caller that may write one system can no longer take an id another
-- system's checker will use, which that checker would then be refused
-- (RUN_ID_CONFLICT). The same id in two systems is two runs.
ALTER TABLE runs DROP CONSTRAINT runs_pkey;
ALTER TABLE runs ADD CONSTRAINT runs_pkey PRIMARY KEY (system_id, run_id);

-- A duplicate's reply names the transition its run caused, found by the
-- run's system and id.
DROP INDEX transitions_by_run;
CREATE INDEX transitions_by_run ON transitions (system_id, run_id) WHERE run_id IS NOT NULL;
