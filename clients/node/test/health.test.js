// HealthCheckService (EvaluateHealth, SubmitRun, GetSystemHealth) through the Node client.

import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';

import grpc from '@grpc/grpc-js';

import { InvalidArgument, SystemNotFound, VitalsClient } from '../src/index.js';
import { newId, target } from './support/env.js';

const client = new VitalsClient(target);
after(() => client.close());

describe('EvaluateHealth', () => {
  test('no runs are healthy by the NO_RUNS rule, with the consecutive defaults', async () => {
    const { status, evaluation } = await client.evaluateHealth([]);
    assert.equal(status, 'HEALTHY');
    assert.equal(evaluation.rule, 'NO_RUNS');
    assert.equal(evaluation.mode, 'CONSECUTIVE');
    assert.deepEqual(evaluation.thresholds, {
      consecutive: { healthyMinSuccessCount: 1, degradedMinFailureCount: 2, unhealthyMinFailureCount: 5 },
    });
  });

  test('two failures in a row reach the default degraded threshold', async () => {
    const { status, evaluation } = await client.evaluateHealth(['unhealthy', 'HEALTH_STATUS_DEGRADED', 'healthy']);
    assert.equal(status, 'DEGRADED');
    assert.equal(evaluation.rule, 'DEGRADED_THRESHOLD_REACHED');
    assert.equal(evaluation.leadingFailureStreak, 2);
  });

  test('window thresholds count the failures anywhere in the window', async () => {
    const window = { windowSize: 5, degradedMinFailureCount: 2, unhealthyMinFailureCount: 4 };
    const statuses = ['healthy', 'unhealthy', 'healthy', 'unhealthy', 'unhealthy', 'healthy', 'healthy'];
    const { status, evaluation } = await client.evaluateHealth(statuses, { window });
    assert.equal(status, 'DEGRADED');
    assert.equal(evaluation.mode, 'WINDOW');
    assert.equal(evaluation.runsConsidered, 5);
    assert.equal(evaluation.failuresInWindow, 3);
    assert.deepEqual(evaluation.thresholds, { window });
  });

  test('invalid thresholds reject with InvalidArgument naming every field', async () => {
    const error = await client
      .evaluateHealth(['healthy'], { window: { windowSize: 2, degradedMinFailureCount: 3, unhealthyMinFailureCount: 7 } })
      .then(() => assert.fail('accepted'), (e) => e);
    assert.ok(error instanceof InvalidArgument);
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(error.reason, 'INVALID_ARGUMENT');
    assert.equal(error.domain, 'vitals.dev');
    assert.deepEqual(
      error.violations.map((v) => v.field),
      ['thresholds.window.window_size'],
    );
    assert.equal(error.retryable, false);
  });

  test('an unknown status name is refused before sending', async () => {
    await assert.rejects(client.evaluateHealth(['fine']), TypeError);
  });
});

describe('SubmitRun', () => {
  test('a run is stored with every field and creates its system', async () => {
    const systemId = newId('node-system');
    const runId = newId('run');
    const observedAt = new Date(Date.now() - 30_000);
    const result = await client.submitRun({
      systemId,
      checkId: 'http',
      status: 'healthy',
      runId,
      observedAt,
      latencyMs: 250,
      message: '200 OK',
    });
    assert.equal(result.duplicate, false);
    assert.equal(result.transition, null);
    assert.deepEqual(
      { ...result.run, recordedAt: undefined },
      { runId, systemId, checkId: 'http', status: 'HEALTHY', observedAt, latencyMs: 250, message: '200 OK', recordedAt: undefined },
    );
    assert.ok(result.run.recordedAt >= observedAt);
    assert.equal(result.systemHealth.status, 'HEALTHY');
    assert.deepEqual(
      result.systemHealth.checks.map((c) => [c.checkId, c.status, c.runsConsidered]),
      [['http', 'HEALTHY', 1]],
    );
  });

  test('resubmitting a run id is a duplicate, not a second run', async () => {
    const run = { systemId: newId('node-system'), checkId: 'http', status: 'unhealthy', runId: newId('run'), observedAt: new Date() };
    assert.equal((await client.submitRun(run)).duplicate, false);
    const again = await client.submitRun(run);
    assert.equal(again.duplicate, true);
    assert.equal(again.systemHealth.checks[0].runsConsidered, 1);
  });

  test('runs crossing the thresholds report each transition of the system', async () => {
    const systemId = newId('node-system');
    const statuses = ['unhealthy', 'unhealthy', 'unhealthy', 'unhealthy', 'unhealthy', 'healthy'];
    const transitions = [];
    for (const status of statuses) {
      const { transition } = await client.submitRun({ systemId, checkId: 'http', status });
      if (transition) transitions.push(transition);
    }
    assert.deepEqual(
      transitions.map((t) => [t.fromStatus, t.toStatus]),
      [
        ['HEALTHY', 'DEGRADED'],
        ['DEGRADED', 'UNHEALTHY'],
        ['UNHEALTHY', 'HEALTHY'],
      ],
    );
    assert.ok(transitions.every((t) => typeof t.sequence === 'bigint' && t.systemId === systemId));
    assert.ok(transitions[0].sequence < transitions[1].sequence && transitions[1].sequence < transitions[2].sequence);
    assert.equal(transitions[2].evaluation.rule, 'RECOVERY_CONFIRMED');

    const health = await client.getSystemHealth(systemId);
    assert.equal(health.status, 'HEALTHY');
    assert.ok(health.evaluatedAt instanceof Date);
  });

  test('a missing system id rejects with the field violation', async () => {
    const error = await client.submitRun({ systemId: '', checkId: 'http', status: 'healthy' }).catch((e) => e);
    assert.ok(error instanceof InvalidArgument);
    assert.deepEqual(
      error.violations.map((v) => v.field),
      ['system_id'],
    );
  });

  test('an unknown system is NOT_FOUND with its id in the error metadata', async () => {
    const systemId = newId('node-missing');
    const error = await client.getSystemHealth(systemId).catch((e) => e);
    assert.ok(error instanceof SystemNotFound);
    assert.equal(error.code, grpc.status.NOT_FOUND);
    assert.deepEqual(error.metadata, { system_id: systemId });
  });
});
