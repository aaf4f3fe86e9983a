-- The run whose submission caused a transition, so that a duplicate of that
-- run (a retry whose first reply was lost) reports the transition too. NULL
-- for a transition caused by a configuration change, and for every
-- transition written before this column existed: which run caused those was
-- never recorded.
ALTER TABLE transitions ADD COLUMN run_id TEXT;

CREATE INDEX transitions_by_run ON transitions (run_id) WHERE run_id IS NOT NULL;
