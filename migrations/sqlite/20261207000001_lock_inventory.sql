-- The embedded store serves one replica, whose lock inventory is its own
-- lock streams in memory: unlike PostgreSQL (lock_inventory, lock_replicas)
-- it stores nothing for ListLocks and GetLock. Kept so that both stores
-- have the same migrations.
SELECT 1;
