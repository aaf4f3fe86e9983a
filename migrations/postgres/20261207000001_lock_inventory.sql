-- What each replica's WithLock streams hold and wait for, published by the
-- replica (every 250 ms, what changed) so that ListLocks and GetLock on any
-- replica see every replica's locks. UNLOGGED: no WAL and no flush, so
-- publishing is never a durable write; after a crash the tables are empty
-- and the replicas publish again. Keys compare byte-wise (COLLATE "C"), as
-- page tokens do.
CREATE UNLOGGED TABLE lock_replicas (
    replica TEXT PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL
);

CREATE UNLOGGED TABLE lock_inventory (
    replica          TEXT NOT NULL,
    holder           BIGINT NOT NULL,
    key              TEXT COLLATE "C" NOT NULL,
    owner            TEXT NOT NULL,
    mode             TEXT NOT NULL,
    holding          BOOLEAN NOT NULL,
    token            BIGINT NOT NULL,
    acquired_at_us   BIGINT NOT NULL,
    lease_expires_us BIGINT NOT NULL,
    PRIMARY KEY (replica, holder)
);

-- Each election's leader, written by the leader's replica when elected,
-- its lease end renewed at each keep-alive, deleted when it steps down:
-- what ObserveLeader on every replica reads. UNLOGGED for the same reason:
-- after a crash the leaders' lock sessions are gone too.
CREATE UNLOGGED TABLE election_leaders (
    election         TEXT PRIMARY KEY,
    value            TEXT NOT NULL,
    token            BIGINT NOT NULL,
    replica          TEXT NOT NULL,
    elected_at_us    BIGINT NOT NULL,
    lease_expires_us BIGINT NOT NULL
);
