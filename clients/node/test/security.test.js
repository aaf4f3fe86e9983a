// TLS, client certificates and bearer tokens: a vitals of this test's own, with
// mTLS and an auth file, on the embedded store in a temporary directory.
// Certificates are made here with the openssl command line tool.

import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import grpc from '@grpc/grpc-js';

import { VitalsClient, VitalsError } from '../src/index.js';
import { newId } from './support/env.js';

const TOKEN = 'node-client-token';
const dir = mkdtempSync(path.join(tmpdir(), 'vitals-node-tls-'));
const file = (name) => path.join(dir, name);
const openssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });

function makePki() {
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', 'ca.key', '-out', 'ca.crt', '-subj', '/CN=test CA', '-days', '1');
  for (const [name, ext] of [
    ['server', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth'],
    ['client', 'subjectAltName=URI:spiffe://test/node\nextendedKeyUsage=clientAuth'],
  ]) {
    writeFileSync(file(`${name}.ext`), `${ext}\n`);
    openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
      '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    openssl('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial',
      '-out', `${name}.crt`, '-days', '1', '-extfile', `${name}.ext`);
  }
}

const freePort = () =>
  new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });

let server;
let target;
let tls;

before(async () => {
  makePki();
  const digest = createHash('sha256').update(TOKEN).digest('hex');
  writeFileSync(
    file('auth.toml'),
    `[[principal]]\nname = "node"\ntoken_sha256 = "${digest}"\nscopes = ["health.read", "health.write", "locks"]\n`,
  );
  const port = await freePort();
  target = `127.0.0.1:${port}`;
  const env = { ...process.env };
  delete env.DATABASE_URL;
  delete env.PGHOST;
  server = spawn(
    process.env.VITALS_BIN,
    ['--listen-addr', target, '--data-dir', file('data'), '--tls-cert-file', file('server.crt'),
      '--tls-key-file', file('server.key'), '--tls-client-ca-file', file('ca.crt'), '--auth-file', file('auth.toml'),
      '--shutdown-grace-ms', '500'],
    { env, stdio: 'ignore' },
  );
  tls = {
    rootCerts: readFileSync(file('ca.crt')),
    privateKey: readFileSync(file('client.key')),
    certChain: readFileSync(file('client.crt')),
    serverName: 'localhost',
  };
  const deadline = Date.now() + 30_000;
  for (;;) {
    assert.equal(server.exitCode, null, 'vitals exited');
    const probe = new VitalsClient(target, { tls, token: TOKEN, timeoutMs: 2000 });
    try {
      await probe.evaluateHealth(['healthy']);
      break;
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((resolve) => setTimeout(resolve, 100));
    } finally {
      probe.close();
    }
  }
});

after(() => {
  server?.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
});

describe('TLS and tokens', () => {
  test('TLS with a client certificate and a token is served', async () => {
    const client = new VitalsClient(target, { tls, token: TOKEN });
    try {
      const systemId = newId('node-system');
      const result = await client.submitRun({ systemId, checkId: 'http', status: 'unhealthy' });
      assert.equal(result.run.systemId, systemId);
      await client.withLock(`${systemId}/lock`, async (grant) => assert.ok(grant.fencingToken > 0n), {
        waitTimeoutMs: 5000,
      });
    } finally {
      client.close();
    }
  });

  test('no token is UNAUTHENTICATED', async () => {
    const client = new VitalsClient(target, { tls });
    try {
      await assert.rejects(
        client.submitRun({ systemId: newId('node-system'), checkId: 'http', status: 'healthy' }),
        (err) => err instanceof VitalsError && err.code === grpc.status.UNAUTHENTICATED && err.reason === 'UNAUTHENTICATED',
      );
    } finally {
      client.close();
    }
  });

  test('plaintext, or TLS without a client certificate, is refused', async () => {
    for (const options of [{}, { tls: { rootCerts: tls.rootCerts, serverName: 'localhost' } }]) {
      const client = new VitalsClient(target, { ...options, token: TOKEN, timeoutMs: 2000 });
      try {
        await assert.rejects(client.evaluateHealth(['healthy']), (err) => err.code === grpc.status.UNAVAILABLE);
      } finally {
        client.close();
      }
    }
  });
});
