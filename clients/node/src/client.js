// VitalsClient: SubmitRun, EvaluateHealth, GetSystemHealth, ConfigureCheck,
// ListSystems, DeleteCheck, DeleteSystem, SetMaintenance, ClearMaintenance,
// GetUptime, ConfigureSystem and WithLock over
// @grpc/grpc-js, with the .proto files of the checkout loaded at run time.
//
// Values cross the edge converted once: statuses are 'HEALTHY' | 'DEGRADED' |
// 'UNHEALTHY', timestamps Date, durations milliseconds, uint64 (sequences,
// fencing tokens) BigInt, errors VitalsError subclasses.
//
// TCP_NODELAY: grpc-js sets it on every connection it opens (socket.setNoDelay),
// so lock keep-alives are never delayed by Nagle's algorithm.

import { fileURLToPath } from 'node:url';
import path from 'node:path';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

import { fromServiceError, LockLost, VitalsError } from './errors.js';

/** proto/ of the checkout; VITALS_PROTO_DIR overrides. */
export const PROTO_DIR =
  process.env.VITALS_PROTO_DIR ?? path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../proto');

const DEFAULT_TIMEOUT_MS = 10_000;
/** Keep-alives go out every lease * this, leaving two thirds as slack. */
export const KEEPALIVE_FRACTION = 1 / 3;
const RELEASE_TIMEOUT_MS = 10_000;

/** A grpc-js interceptor adding `authorization: Bearer <token>` to every call. */
function bearer(token) {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set('authorization', `Bearer ${token}`);
        next(metadata, listener);
      },
    });
}

let services;
function loadServices() {
  // google/protobuf/{duration,timestamp}.proto come with protobufjs.
  services ??= grpc.loadPackageDefinition(
    protoLoader.loadSync(['vitals/v1/health.proto', 'vitals/v1/lock.proto'], {
      includeDirs: [PROTO_DIR],
      longs: String, // uint64 as decimal strings, made BigInt below: no precision loss
      enums: String,
      defaults: true,
      oneofs: true,
    }),
  ).vitals.v1;
  return services;
}

// ------------------------------------------------------------- conversions

const STATUS_PREFIX = 'HEALTH_STATUS_';
const STATUSES = new Set(['HEALTHY', 'DEGRADED', 'UNHEALTHY']);

function statusIn(value) {
  const name = String(value).trim().toUpperCase().replace(STATUS_PREFIX, '');
  if (!STATUSES.has(name)) throw new TypeError(`unknown health status ${JSON.stringify(value)}`);
  return STATUS_PREFIX + name;
}

const strip = (prefix) => (value) => (value ?? '').replace(prefix, '');
const statusOut = strip(STATUS_PREFIX);
const modeOut = strip('EVALUATION_MODE_');
const ruleOut = strip('EVALUATION_RULE_');

function timestampIn(date, what = 'observedAt') {
  if (!(date instanceof Date) || Number.isNaN(date.getTime())) throw new TypeError(`${what} must be a valid Date`);
  const ms = date.getTime();
  return { seconds: String(Math.floor(ms / 1000)), nanos: (((ms % 1000) + 1000) % 1000) * 1e6 };
}

const timestampOut = (t) => (t ? new Date(Number(t.seconds) * 1000 + Math.floor(t.nanos / 1e6)) : null);

function durationIn(ms, what) {
  if (!Number.isFinite(ms) || ms < 0) throw new TypeError(`${what} must be a non-negative number of milliseconds`);
  const whole = Math.floor(ms);
  return { seconds: String(Math.floor(whole / 1000)), nanos: (whole % 1000) * 1e6 + Math.round((ms - whole) * 1e6) };
}

const durationOut = (d) => (d ? Number(d.seconds) * 1000 + d.nanos / 1e6 : null);

function thresholdsOut(t) {
  if (!t?.mode) return null;
  return { [t.mode]: { ...t[t.mode] } };
}

function evaluationOut(e) {
  if (!e) return null;
  return {
    mode: modeOut(e.mode),
    runsConsidered: e.runsConsidered,
    leadingFailureStreak: e.leadingFailureStreak,
    leadingSuccessStreak: e.leadingSuccessStreak,
    failuresInWindow: e.failuresInWindow,
    rule: ruleOut(e.rule),
    thresholds: thresholdsOut(e.thresholds),
  };
}

function runOut(r) {
  return {
    runId: r.runId,
    systemId: r.systemId,
    checkId: r.checkId,
    status: statusOut(r.status),
    observedAt: timestampOut(r.observedAt),
    latencyMs: durationOut(r.latency),
    message: r.message,
    recordedAt: timestampOut(r.recordedAt),
  };
}

function checkOut(c) {
  return {
    checkId: c.checkId,
    status: statusOut(c.status),
    evaluation: evaluationOut(c.evaluation),
    runsConsidered: c.runsConsidered,
    lastRunAt: timestampOut(c.lastRunAt),
    thresholds: thresholdsOut(c.thresholds),
    enabled: c.enabled,
    flapping: c.flapping,
    flappingSettings: c.flappingSettings ?? null,
  };
}

function windowOut(w) {
  return { startsAt: timestampOut(w.startsAt), endsAt: timestampOut(w.endsAt), reason: w.reason };
}

function systemOut(s) {
  if (!s) return null;
  return {
    systemId: s.systemId,
    status: statusOut(s.status),
    checks: s.checks.map(checkOut),
    evaluatedAt: timestampOut(s.evaluatedAt),
    maintenanceWindows: s.maintenanceWindows.map(windowOut),
    inMaintenance: s.inMaintenance,
    dependsOn: [...s.dependsOn],
  };
}

function transitionOut(t) {
  if (!t) return null;
  return {
    sequence: BigInt(t.sequence),
    systemId: t.systemId,
    checkId: t.checkId,
    fromStatus: statusOut(t.fromStatus),
    toStatus: statusOut(t.toStatus),
    transitionedAt: timestampOut(t.transitionedAt),
    evaluation: evaluationOut(t.evaluation),
    checkDeleted: t.checkDeleted,
    inMaintenance: t.inMaintenance,
    flapping: t.flapping,
    causedBy: [...t.causedBy],
  };
}

// ------------------------------------------------------------------ client

/**
 * A connection to one vitals server.
 *
 *   const vitals = new VitalsClient('127.0.0.1:50051');
 *   await vitals.submitRun({ systemId: 'checkout', checkId: 'http', status: 'healthy' });
 *   await vitals.withLock('nightly-report', async (grant) => writeReport(grant.fencingToken));
 *   vitals.close();
 */
export class VitalsClient {
  #health;
  #locks;
  #timeoutMs;

  /**
   * @param {string} target host:port or any gRPC target
   * @param {object} [options]
   * @param {import('@grpc/grpc-js').ChannelCredentials} [options.credentials] default: insecure, or
   *   TLS when `tls` is given
   * @param {object} [options.tls] speak TLS: `rootCerts` (PEM Buffer of the CA that issued the server's
   *   certificate; omitted: the system's CAs), `privateKey` and `certChain` (PEM Buffers, for mTLS),
   *   `serverName` (the name the server's certificate must carry, when not the target's host)
   * @param {string} [options.token] sent as `authorization: Bearer <token>` on every call
   * @param {object} [options.channelOptions] grpc-js channel options
   * @param {number} [options.timeoutMs] deadline of unary calls (default 10 s)
   */
  constructor(target, { credentials, tls, token, channelOptions = {}, timeoutMs } = {}) {
    const { HealthCheckService, LockService } = loadServices();
    if (tls) {
      credentials ??= grpc.credentials.createSsl(tls.rootCerts ?? null, tls.privateKey ?? null, tls.certChain ?? null);
      if (tls.serverName) channelOptions = { ...channelOptions, 'grpc.ssl_target_name_override': tls.serverName };
    }
    credentials ??= grpc.credentials.createInsecure();
    if (token !== undefined) {
      // An interceptor rather than call credentials: grpc-js refuses those on a
      // plaintext channel, and a token without TLS is legitimate on loopback or
      // behind a mesh that encrypts.
      channelOptions = { ...channelOptions, interceptors: [...(channelOptions.interceptors ?? []), bearer(token)] };
    }
    this.#health = new HealthCheckService(target, credentials, channelOptions);
    // One channel for both services.
    this.#locks = new LockService(target, credentials, { ...channelOptions, channelOverride: this.#health.getChannel() });
    this.#timeoutMs = timeoutMs ?? DEFAULT_TIMEOUT_MS;
  }

  close() {
    this.#health.close();
  }

  #unary(method, request, timeoutMs) {
    const deadline = new Date(Date.now() + (timeoutMs ?? this.#timeoutMs));
    return new Promise((resolve, reject) => {
      this.#health[method](request, { deadline }, (err, response) =>
        err ? reject(fromServiceError(err)) : resolve(response),
      );
    });
  }

  /**
   * Evaluates run statuses (newest first) without storing anything.
   * @param {string[]} statuses e.g. ['unhealthy', 'healthy']
   * @param {{consecutive?: object, window?: object}} [thresholds] unset: consecutive defaults
   * @returns {Promise<{status: string, evaluation: object}>}
   */
  async evaluateHealth(statuses, thresholds, { timeoutMs } = {}) {
    const request = { statuses: statuses.map(statusIn) };
    if (thresholds) request.thresholds = thresholds;
    const r = await this.#unary('EvaluateHealth', request, timeoutMs);
    return { status: statusOut(r.status), evaluation: evaluationOut(r.evaluation) };
  }

  /**
   * Records one run; idempotent when runId is given (a retry reports duplicate: true).
   * @param {object} run
   * @param {string} run.systemId
   * @param {string} run.checkId
   * @param {string} run.status 'healthy' | 'degraded' | 'unhealthy'
   * @param {string} [run.runId]
   * @param {Date} [run.observedAt] default: now, on the server
   * @param {number} [run.latencyMs]
   * @param {string} [run.message]
   */
  async submitRun({ systemId, checkId, status, runId = '', observedAt, latencyMs, message = '' }, { timeoutMs } = {}) {
    const request = { runId, systemId, checkId, status: statusIn(status), message };
    if (observedAt !== undefined) request.observedAt = timestampIn(observedAt);
    if (latencyMs !== undefined) request.latency = durationIn(latencyMs, 'latencyMs');
    const r = await this.#unary('SubmitRun', request, timeoutMs);
    return {
      run: runOut(r.run),
      systemHealth: systemOut(r.systemHealth),
      transition: transitionOut(r.transition),
      duplicate: r.duplicate,
    };
  }

  /** The stored health of a system; rejects with SystemNotFound for an unknown one. */
  async getSystemHealth(systemId, { timeoutMs } = {}) {
    const r = await this.#unary('GetSystemHealth', { systemId }, timeoutMs);
    return systemOut(r.systemHealth);
  }

  /**
   * Creates or updates a check; undefined leaves a setting as it is.
   * @param {string} systemId
   * @param {string} checkId
   * @param {object} [change]
   * @param {{consecutive?: object, window?: object}} [change.thresholds]
   * @param {boolean} [change.enabled]
   * @param {{runs: number, startChanges: number, stopChanges: number} | false} [change.flapping]
   *   settings turn flapping detection on, false turns it off
   */
  async configureCheck(systemId, checkId, { thresholds, enabled, flapping } = {}, { timeoutMs } = {}) {
    const request = { systemId, checkId };
    if (thresholds) request.thresholds = thresholds;
    if (enabled !== undefined) request.enabled = enabled;
    if (flapping === false) request.flapping = { runs: 0, startChanges: 0, stopChanges: 0 };
    else if (flapping) request.flapping = flapping;
    const r = await this.#unary('ConfigureCheck', request, timeoutMs);
    return { check: checkOut(r.check), systemHealth: systemOut(r.systemHealth), transition: transitionOut(r.transition) };
  }

  /**
   * Every stored system (with `status`, whose id starts with `prefix`), in
   * byte order of their ids, fetching pages as it goes.
   * @returns {AsyncGenerator<object>}
   */
  async *listSystems({ status, prefix = '', pageSize = 0 } = {}, { timeoutMs } = {}) {
    let pageToken = '';
    do {
      const request = { systemIdPrefix: prefix, pageSize, pageToken };
      if (status !== undefined) request.status = statusIn(status);
      const r = await this.#unary('ListSystems', request, timeoutMs);
      for (const s of r.systems) {
        yield {
          systemId: s.systemId,
          status: statusOut(s.status),
          checkCount: s.checkCount,
          lastRunAt: timestampOut(s.lastRunAt),
          inMaintenance: s.inMaintenance,
          flapping: s.flapping,
          evaluatedAt: timestampOut(s.evaluatedAt),
        };
      }
      pageToken = r.nextPageToken;
    } while (pageToken);
  }

  /** Deletes a check and its runs; deleting what is gone resolves with deleted: false. */
  async deleteCheck(systemId, checkId, { timeoutMs } = {}) {
    const r = await this.#unary('DeleteCheck', { systemId, checkId }, timeoutMs);
    return { deleted: r.deleted, systemHealth: systemOut(r.systemHealth), transition: transitionOut(r.transition) };
  }

  /** Deletes a system (its transitions stay); resolves false when there was none. */
  async deleteSystem(systemId, { timeoutMs } = {}) {
    const r = await this.#unary('DeleteSystem', { systemId }, timeoutMs);
    return r.deleted;
  }

  /**
   * Schedules a maintenance window (from now without startsAt); one it
   * overlaps or touches is merged with it.
   */
  async setMaintenance(systemId, { endsAt, startsAt, reason = '' }, { timeoutMs } = {}) {
    const request = { systemId, endsAt: timestampIn(endsAt, 'endsAt'), reason };
    if (startsAt !== undefined) request.startsAt = timestampIn(startsAt, 'startsAt');
    const r = await this.#unary('SetMaintenance', request, timeoutMs);
    return { window: windowOut(r.window), systemHealth: systemOut(r.systemHealth) };
  }

  /** Ends the open maintenance window now and removes upcoming ones. */
  async clearMaintenance(systemId, { timeoutMs } = {}) {
    const r = await this.#unary('ClearMaintenance', { systemId }, timeoutMs);
    return { cleared: r.cleared, systemHealth: systemOut(r.systemHealth) };
  }

  /** Time per status over `windowMs` ending now (capped at 90 days); durations in ms. */
  async getUptime(systemId, windowMs, { timeoutMs } = {}) {
    const r = await this.#unary('GetUptime', { systemId, window: durationIn(windowMs, 'windowMs') }, timeoutMs);
    return {
      systemId: r.systemId,
      windowStart: timestampOut(r.windowStart),
      windowEnd: timestampOut(r.windowEnd),
      countedFrom: timestampOut(r.countedFrom),
      healthyMs: durationOut(r.healthy),
      degradedMs: durationOut(r.degraded),
      unhealthyMs: durationOut(r.unhealthy),
      maintenanceMs: durationOut(r.maintenance),
      healthyPercent: r.healthyPercent,
      degradedPercent: r.degradedPercent,
      unhealthyPercent: r.unhealthyPercent,
    };
  }

  /** Sets what a system depends on; a cycle rejects with InvalidArgument on depends_on. */
  async configureSystem(systemId, dependsOn, { timeoutMs } = {}) {
    const r = await this.#unary('ConfigureSystem', { systemId, dependsOn }, timeoutMs);
    return systemOut(r.systemHealth);
  }

  /**
   * Runs fn(grant) while holding the distributed lock `key`, and returns its
   * result. Keep-alives go out every third of the lease while fn runs; the
   * lock is released when fn settles.
   *
   * grant: { key, owner, fencingToken (BigInt), acquiredAt, leaseMs, signal,
   * lost, ensureHeld() }. `signal` aborts, with a LockLost as its reason, the
   * moment the lock is lost: pass it to work that should stop then. If the
   * lock was lost while fn ran, withLock rejects with LockLost even when fn
   * succeeded: part of fn ran unprotected.
   *
   * @template T
   * @param {string} key
   * @param {(grant: object) => Promise<T> | T} fn
   * @param {object} [options]
   * @param {number} [options.waitTimeoutMs] unset: the server's default wait; 0: try once
   * @param {string} [options.owner] who holds the lock, for humans
   * @param {number} [options.keepAliveIntervalMs] default lease/3; 0 disables keep-alives
   * @returns {Promise<T>}
   */
  async withLock(key, fn, { waitTimeoutMs, owner = '', keepAliveIntervalMs } = {}) {
    return this.#holdLock(key, fn, { waitTimeoutMs, owner, keepAliveIntervalMs });
  }

  /**
   * withLock, held shared: with any number of other shared holders of `key`,
   * never with an exclusive one. A shared acquirer that arrives while an
   * exclusive one waits waits behind it. Options as withLock's.
   */
  async withSharedLock(key, fn, options = {}) {
    return this.#holdLock(key, fn, { ...options, mode: 'LOCK_MODE_SHARED' });
  }

  /**
   * withLock of a semaphore: at most `maxHolders` (2 to 256) holders of `key`
   * at once, each with its own fencing token. Every acquirer of the key must
   * name the same maxHolders (else LockModeMismatch). Options as withLock's.
   */
  async withSemaphore(key, maxHolders, fn, options = {}) {
    return this.#holdLock(key, fn, { ...options, maxHolders });
  }

  /**
   * Runs fn(leadership) while this candidate leads `election`, as withLock
   * runs fn(grant) while holding a lock: it waits to be elected (waitTimeoutMs),
   * keeps the leadership alive, and resigns when fn settles. leadership is
   * withLock's grant, with `key` the election and `owner` the value.
   */
  async campaign(election, value, fn, { waitTimeoutMs, keepAliveIntervalMs } = {}) {
    const campaign = { election, candidateValue: value };
    if (waitTimeoutMs !== undefined) campaign.waitTimeout = durationIn(waitTimeoutMs, 'waitTimeoutMs');
    return this.#hold(this.#locks.Campaign(), { campaign }, CAMPAIGN_EVENTS, election, value, fn, keepAliveIntervalMs);
  }

  /**
   * Calls onLeader(leader) for each leader of `election`: the current one,
   * then each new one, once each, in order, never one whose lease has ended.
   * leader: { value, fencingToken (BigInt), electedAt, leaseExpiresAt,
   * replica }. Returns { cancel(), lastToken, done } where `done` settles when
   * the stream ends (rejecting with its error unless cancelled); resume with
   * afterToken = lastToken.
   */
  observe(election, onLeader, { afterToken = 0n } = {}) {
    const call = this.#locks.ObserveLeader({ election, afterToken: String(afterToken) });
    let cancelled = false;
    const watch = {
      lastToken: BigInt(afterToken),
      cancel() {
        cancelled = true;
        call.cancel();
      },
    };
    watch.done = new Promise((resolve, reject) => {
      call.on('data', ({ leader }) => {
        const out = {
          value: leader.value,
          fencingToken: BigInt(leader.fencingToken),
          electedAt: timestampOut(leader.electedAt),
          leaseExpiresAt: timestampOut(leader.leaseExpiresAt),
          replica: leader.replica,
        };
        watch.lastToken = out.fencingToken;
        onLeader(out);
      });
      call.on('error', (err) => (cancelled && err.code === grpc.status.CANCELLED ? resolve() : reject(fromServiceError(err))));
      call.on('end', resolve);
    });
    return watch;
  }

  async #holdLock(key, fn, { waitTimeoutMs, owner = '', keepAliveIntervalMs, mode, maxHolders } = {}) {
    const acquire = { key, owner };
    if (mode !== undefined) acquire.mode = mode;
    if (maxHolders !== undefined) acquire.maxHolders = maxHolders;
    if (waitTimeoutMs !== undefined) acquire.waitTimeout = durationIn(waitTimeoutMs, 'waitTimeoutMs');
    return this.#hold(this.#locks.WithLock(), { acquire }, LOCK_EVENTS, key, owner, fn, keepAliveIntervalMs);
  }

  /** One held-lock stream: `first` sent on `call`, events named by `names`. */
  async #hold(call, opening, names, key, owner, fn, keepAliveIntervalMs) {
    const inbox = new Inbox(call);
    call.write(opening);

    let first;
    try {
      first = await inbox.next();
    } catch (err) {
      call.end();
      throw fromServiceError(err);
    }
    if (first?.event !== names.granted) {
      call.cancel();
      throw new VitalsError({ code: grpc.status.INTERNAL, message: `lock stream ended before ${names.granted}` });
    }
    const granted = first[names.granted];

    const controller = new AbortController();
    const grant = {
      key,
      owner,
      fencingToken: BigInt(granted.fencingToken),
      acquiredAt: timestampOut(granted.acquiredAt),
      leaseMs: durationOut(granted.lease),
      signal: controller.signal,
      heldForMs: null,
      get lost() {
        return controller.signal.aborted;
      },
      ensureHeld() {
        controller.signal.throwIfAborted();
      },
    };

    let releasing = false;
    const interval = keepAliveIntervalMs ?? Math.max(grant.leaseMs * KEEPALIVE_FRACTION, 10);
    const timer = interval > 0 ? setInterval(() => call.write({ keepAlive: {} }), interval) : null;
    // While held, the stream only ends in an error if the lock is lost.
    inbox.onError = (err) => {
      clearInterval(timer);
      if (releasing) return;
      const lost = fromServiceError(err);
      controller.abort(lost instanceof LockLost ? lost : new LockLost({ ...lost, message: lost.details, cause: err }));
    };

    let outcome;
    try {
      outcome = { value: await fn(grant) };
    } catch (error) {
      outcome = { error };
    }

    clearInterval(timer);
    let releaseError = null;
    if (grant.lost) {
      call.end();
      releaseError = controller.signal.reason;
    } else {
      releasing = true;
      call.write(names.release);
      call.end();
      try {
        // Acknowledgements of keep-alives sent before the release may come first.
        const released = await withTimeout(
          (async () => {
            let message = await inbox.next();
            while (message?.event === 'keptAlive') message = await inbox.next();
            return message;
          })(),
          RELEASE_TIMEOUT_MS,
          () => call.cancel(),
        );
        if (released?.event !== names.released) throw new Error(`lock stream ended before ${names.released}`);
        grant.heldForMs = durationOut(released[names.released].heldFor);
      } catch (err) {
        releaseError = fromServiceError(err);
        if (releaseError instanceof LockLost) controller.abort(releaseError);
      }
    }
    if ('error' in outcome) throw outcome.error; // fn's own failure comes first
    if (releaseError) throw releaseError;
    return outcome.value;
  }
}

/** The events and messages of a WithLock stream, and of a Campaign stream. */
const LOCK_EVENTS = { granted: 'acquired', released: 'released', release: { release: {} } };
const CAMPAIGN_EVENTS = { granted: 'elected', released: 'resigned', release: { resign: {} } };

/** Messages of a stream as promises, in order, with its error kept. */
class Inbox {
  #queue = [];
  #waiter = null;
  #done = false;
  #error = null;
  /** Called once with the stream's error, if it ends with one. */
  onError = null;

  constructor(call) {
    call.on('data', (message) => this.#settle({ message }));
    call.on('error', (error) => {
      this.#error ??= error;
      this.#done = true;
      this.#settle(null);
      this.onError?.(error);
    });
    call.on('end', () => {
      this.#done = true;
      this.#settle(null);
    });
  }

  #settle(item) {
    if (item) this.#queue.push(item);
    if (!this.#waiter) return;
    const { resolve, reject } = this.#waiter;
    if (this.#queue.length) {
      this.#waiter = null;
      resolve(this.#queue.shift().message);
    } else if (this.#error) {
      this.#waiter = null;
      reject(this.#error);
    } else if (this.#done) {
      this.#waiter = null;
      resolve(null);
    }
  }

  /** The next message; null when the stream ended; rejects with its error. */
  next() {
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
      this.#settle(null);
    });
  }
}

function withTimeout(promise, ms, onTimeout) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => {
      onTimeout();
      reject(new VitalsError({ code: grpc.status.DEADLINE_EXCEEDED, message: `no answer within ${ms} ms` }));
    }, ms);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}
