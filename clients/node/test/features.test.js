// Listing, deleting, maintenance, uptime, flapping and dependencies through the Node client.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';

import { InvalidArgument, SystemNotFound, VitalsClient } from '../src/index.js';
import { newId, target } from './support/env.js';

const client = new VitalsClient(target);
after(() => client.close());

// One failure degrades, two make unhealthy, one success recovers.
const sensitive = { consecutive: { healthyMinSuccessCount: 1, degradedMinFailureCount: 1, unhealthyMinFailureCount: 2 } };

async function collect(generator) {
  const out = [];
  for await (const item of generator) out.push(item);
  return out;
}

test('listSystems filters by prefix and status across pages', async () => {
  const prefix = newId('node-list');
  for (const [suffix, status] of [['a', 'healthy'], ['b', 'unhealthy'], ['c', 'healthy']]) {
    await client.configureCheck(`${prefix}-${suffix}`, 'http', { thresholds: sensitive });
    await client.submitRun({ systemId: `${prefix}-${suffix}`, checkId: 'http', status });
  }
  const every = await collect(client.listSystems({ prefix, pageSize: 1 }));
  assert.deepEqual(every.map((s) => s.systemId), [`${prefix}-a`, `${prefix}-b`, `${prefix}-c`]);
  assert.equal(every[0].checkCount, 1);
  const degraded = await collect(client.listSystems({ prefix, status: 'degraded' }));
  assert.deepEqual(degraded.map((s) => s.systemId), [`${prefix}-b`]);
});

test('deleting the failing check recovers the system and deleting again is harmless', async () => {
  const systemId = newId('node-delete');
  await client.configureCheck(systemId, 'disk', { thresholds: sensitive });
  await client.submitRun({ systemId, checkId: 'disk', status: 'unhealthy' });
  const deleted = await client.deleteCheck(systemId, 'disk');
  assert.equal(deleted.deleted, true);
  assert.equal(deleted.transition.checkDeleted, true);
  assert.equal(deleted.systemHealth.status, 'HEALTHY');
  assert.equal((await client.deleteCheck(systemId, 'disk')).deleted, false);
  assert.equal(await client.deleteSystem(systemId), true);
  assert.equal(await client.deleteSystem(systemId), false);
  await assert.rejects(client.getSystemHealth(systemId), SystemNotFound);
});

test('a transition in a maintenance window is marked and clearing ends the window', async () => {
  const systemId = newId('node-maintenance');
  await client.configureCheck(systemId, 'http', { thresholds: sensitive });
  const set = await client.setMaintenance(systemId, {
    startsAt: new Date(Date.now() - 60_000),
    endsAt: new Date(Date.now() + 3_600_000),
    reason: 'upgrade',
  });
  assert.equal(set.window.reason, 'upgrade');
  assert.equal(set.systemHealth.inMaintenance, true);
  const { transition } = await client.submitRun({ systemId, checkId: 'http', status: 'unhealthy' });
  assert.equal(transition.inMaintenance, true);
  const cleared = await client.clearMaintenance(systemId);
  assert.equal(cleared.cleared, 1);
  assert.equal(cleared.systemHealth.inMaintenance, false);
});

test('uptime splits the window and rejects an unknown system', async () => {
  const systemId = newId('node-uptime');
  await client.submitRun({ systemId, checkId: 'http', status: 'healthy' });
  const uptime = await client.getUptime(systemId, 86_400_000);
  assert.equal(uptime.windowEnd - uptime.windowStart, 86_400_000);
  assert.equal(uptime.healthyPercent, 100);
  assert.equal(uptime.unhealthyMs, 0);
  await assert.rejects(client.getUptime(`${systemId}-never`, 60_000), SystemNotFound);
});

test('a check flaps once its runs keep changing', async () => {
  const systemId = newId('node-flapping');
  const flapping = { runs: 10, startChanges: 3, stopChanges: 2 };
  const configured = await client.configureCheck(systemId, 'http', { thresholds: sensitive, flapping });
  assert.deepEqual(configured.check.flappingSettings, flapping);
  let last;
  for (const status of ['healthy', 'unhealthy', 'healthy', 'unhealthy']) {
    last = await client.submitRun({ systemId, checkId: 'http', status });
  }
  assert.equal(last.systemHealth.checks[0].flapping, true);
  assert.equal(last.transition.flapping, true);
  const off = await client.configureCheck(systemId, 'http', { flapping: false });
  assert.equal(off.check.flappingSettings, null);
});

test('an outage names the dependency already down and a cycle is refused', async () => {
  const api = newId('node-api');
  const db = newId('node-db');
  for (const s of [api, db]) await client.configureCheck(s, 'http', { thresholds: sensitive });
  assert.deepEqual((await client.configureSystem(api, [db])).dependsOn, [db]);
  await client.submitRun({ systemId: db, checkId: 'http', status: 'unhealthy' });
  const { transition } = await client.submitRun({ systemId: api, checkId: 'http', status: 'unhealthy' });
  assert.deepEqual(transition.causedBy, [db]);
  const error = await client.configureSystem(db, [api]).then(() => assert.fail('accepted'), (e) => e);
  assert.ok(error instanceof InvalidArgument);
  assert.deepEqual(error.violations.map((v) => v.field), ['depends_on']);
});
