-- Fencing tokens of the lock manager: one row, advanced by the statement that
-- grants a batch of locks and committed (synchronous_commit=on) before any of
-- the batch's tokens is reported, so no token is ever handed out twice, even
-- across a crash. It starts far above anything the old sequence handed out:
-- the sequence's values were drawn in transactions that always rolled back,
-- so the newest of them may never have reached the disk. A database that never
-- granted a lock starts at token 1.
CREATE TABLE vitals_fencing (
    id         integer PRIMARY KEY CHECK (id = 1),
    last_token bigint NOT NULL
);

INSERT INTO vitals_fencing (id, last_token)
SELECT 1, CASE WHEN is_called THEN last_value + 1000000 ELSE 0 END FROM lock_fencing_tokens;
