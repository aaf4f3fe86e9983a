// The server run_tests.sh started, and ids no other test uses.

import { randomUUID } from 'node:crypto';

export const target = process.env.VITALS_TARGET;
if (!target) throw new Error('VITALS_TARGET is not set: run the tests with clients/node/run_tests.sh');

/** The lease the test server grants (its --database-lock-idle-tx-timeout-ms). */
export const leaseMs = Number(process.env.VITALS_TEST_LOCK_LEASE_MS ?? 30_000);

/** newId('lock') -> 'lock-1f3a...': unique per call, so tests share one database. */
export const newId = (prefix) => `${prefix}-${randomUUID().slice(0, 12)}`;
