-- Fencing tokens of the lock manager. The statement that grants locks draws
-- them with nextval, commits, and also takes a transaction id, so its commit
-- is flushed (synchronous_commit=on on the lock sessions) before any token of
-- it is reported. The old sequence was drawn in transactions that always
-- rolled back, so its newest values could be lost in a crash and handed out
-- again. No CACHE: values must rise across sessions in the order drawn.
-- It starts far above anything the old sequence handed out (its newest
-- values may never have reached the disk); a database that never granted a
-- lock starts at token 1.
CREATE SEQUENCE vitals_fencing_tokens AS bigint START 1 CACHE 1;

SELECT setval('vitals_fencing_tokens', last_value + 1000000)
FROM lock_fencing_tokens WHERE is_called;
