// A second process holding a vitals lock, driven over stdin/stdout.
//
// Usage: node lock_holder.js TARGET KEY
// Takes KEY, prints {"fencingToken": "N"}, waits for a line on stdin, then
// releases and prints {"heldForMs": N}. lock.test.js runs it to hold a lock
// in another process, on another connection.

import { once } from 'node:events';
import readline from 'node:readline';

import { VitalsClient } from '../../src/index.js';

const [target, key] = process.argv.slice(2);
const client = new VitalsClient(target);
const lines = readline.createInterface({ input: process.stdin });
const grant = await client.withLock(
  key,
  async (held) => {
    console.log(JSON.stringify({ fencingToken: String(held.fencingToken) }));
    await once(lines, 'line'); // held, with keep-alives, until the test says so
    return held;
  },
  { waitTimeoutMs: 10_000, owner: 'lock_holder.js' },
);
console.log(JSON.stringify({ heldForMs: grant.heldForMs }));
lines.close();
client.close();
