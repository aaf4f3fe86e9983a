-- Retention deletes each check's old runs through runs_by_check and each
-- system's old transitions through transitions_by_system; nothing reads the
-- age indexes any more, and every insert and delete paid for them.
DROP INDEX IF EXISTS runs_by_age;
DROP INDEX IF EXISTS transitions_by_age;
