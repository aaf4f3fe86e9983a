// Waits until a vitals answers grpc.health.v1 Check("") with SERVING.
//
// Usage: node wait_serving.js TARGET PID [TIMEOUT_SECONDS]
// Exits 0 once SERVING; 1 if process PID died first or the timeout passed.
// Used by run_tests.sh (via clients/testenv.sh) before the tests start.

import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

import grpc from '@grpc/grpc-js';

// HealthCheckRequest{service=""} encodes to no bytes; HealthCheckResponse
// {status=SERVING (1)} to 08 01. No health proto needed for that.
const CHECK = '/grpc.health.v1.Health/Check';
const SERVING = Buffer.from([0x08, 0x01]);

function alive(pid) {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    // An exited child stays a zombie until the shell reaps it.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return true;
  }
}

const [target, pidArg, timeoutArg = '60'] = process.argv.slice(2);
const pid = Number(pidArg);
const deadline = Date.now() + Number(timeoutArg) * 1000;
const client = new grpc.Client(target, grpc.credentials.createInsecure());
const check = () =>
  new Promise((resolve) => {
    client.makeUnaryRequest(CHECK, (b) => b, (b) => b, Buffer.alloc(0), { deadline: Date.now() + 1000 }, (err, reply) =>
      resolve(err ? `${grpc.status[err.code]}: ${err.details}` : reply),
    );
  });

let last = 'no answer';
let code = 1;
while (Date.now() < deadline) {
  if (!alive(pid)) {
    last = `vitals (pid ${pid}) exited`;
    break;
  }
  const reply = await check();
  if (Buffer.isBuffer(reply) && reply.equals(SERVING)) {
    code = 0;
    break;
  }
  last = Buffer.isBuffer(reply) ? `status bytes ${reply.toString('hex')}` : reply;
  await sleep(100);
}
client.close();
if (code !== 0) console.error(`wait_serving: ${target} not SERVING (${last})`);
process.exit(code);
