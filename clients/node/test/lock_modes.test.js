// Shared locks, semaphores and elections through the Node client.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { LockModeMismatch, LockNotAvailable, VitalsClient } from '../src/index.js';
import { newId, target } from './support/env.js';

const client = new VitalsClient(target);
const other = new VitalsClient(target);
after(() => {
  client.close();
  other.close();
});

async function waitUntil(condition, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

test('shared holders hold a key together and keep an exclusive one out', async () => {
  const key = newId('node-shared');
  const tokens = await client.withSharedLock(key, (first) =>
    other.withSharedLock(key, async (second) => {
      await assert.rejects(client.withLock(key, () => {}, { waitTimeoutMs: 0 }), LockNotAvailable);
      return [first.fencingToken, second.fencingToken];
    }, { waitTimeoutMs: 0 }),
  );
  assert.notEqual(tokens[0], tokens[1]);
  const writer = await client.withLock(key, (grant) => grant.fencingToken, { waitTimeoutMs: 0 });
  assert.ok(writer > tokens[1]);
});

test('a semaphore admits its size and refuses another size', async () => {
  const key = newId('node-semaphore');
  await client.withSemaphore(key, 2, () =>
    other.withSemaphore(key, 2, async () => {
      await assert.rejects(client.withSemaphore(key, 2, () => {}, { waitTimeoutMs: 0 }), LockNotAvailable);
      await assert.rejects(client.withSemaphore(key, 3, () => {}, { waitTimeoutMs: 0 }), (err) => {
        assert.ok(err instanceof LockModeMismatch);
        assert.equal(err.metadata.held_as, 'a semaphore of 2');
        return true;
      });
    }),
  );
});

test('observers see each leader once, in order', async () => {
  const election = newId('node-election');
  const seen = [];
  const watch = other.observe(election, (leader) => seen.push([leader.value, leader.fencingToken]));
  const tokens = [];
  for (const value of ['first', 'second']) {
    await client.campaign(election, value, async (leadership) => {
      tokens.push(leadership.fencingToken);
      await waitUntil(() => seen.some(([v, t]) => v === value && t === leadership.fencingToken), 10_000, `${value} observed`);
    }, { waitTimeoutMs: 5000 });
  }
  watch.cancel();
  await watch.done;
  assert.deepEqual(seen, [
    ['first', tokens[0]],
    ['second', tokens[1]],
  ]);
  assert.equal(watch.lastToken, tokens[1]);
});
