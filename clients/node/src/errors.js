// Errors of the vitals client, built once from the status details.
//
// vitals sends a google.rpc.Status in the grpc-status-details-bin trailer of
// every error, holding an ErrorInfo (reason, domain, metadata) and, by error,
// a BadRequest or a RetryInfo. fromServiceError decodes it so callers branch
// on classes and `reason`, never on message text.

import grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';

/** ErrorInfo.domain of the errors vitals produces. */
export const ERROR_DOMAIN = 'vitals.dev';

// The google.rpc messages vitals sends, with googleapis' field numbers
// (google/rpc/status.proto, google/rpc/error_details.proto). Declared here
// rather than loaded from a copy of googleapis: four small, frozen messages.
const rpc = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
            Duration: { fields: { seconds: { type: 'int64', id: 1 }, nanos: { type: 'int32', id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            BadRequest: {
              fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
                },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: 'google.protobuf.Duration', id: 1 } } },
          },
        },
      },
    },
  },
});
const Status = rpc.lookupType('google.rpc.Status');
const DETAIL_TYPES = {
  'type.googleapis.com/google.rpc.ErrorInfo': rpc.lookupType('google.rpc.ErrorInfo'),
  'type.googleapis.com/google.rpc.BadRequest': rpc.lookupType('google.rpc.BadRequest'),
  'type.googleapis.com/google.rpc.RetryInfo': rpc.lookupType('google.rpc.RetryInfo'),
};

/** A failed vitals RPC. */
export class VitalsError extends Error {
  /**
   * @param {object} fields
   * @param {number} fields.code gRPC status code (grpc.status).
   * @param {string} fields.message the server's message (fixed text, safe to log).
   * @param {string|null} [fields.reason] ErrorInfo.reason, e.g. 'LOCK_NOT_AVAILABLE'.
   * @param {string|null} [fields.domain] ErrorInfo.domain, 'vitals.dev' for vitals' own.
   * @param {Record<string,string>} [fields.metadata] ErrorInfo.metadata.
   * @param {{field: string, description: string}[]} [fields.violations] BadRequest.
   * @param {number|null} [fields.retryDelayMs] RetryInfo.retry_delay.
   * @param {unknown} [fields.cause] the grpc-js error.
   */
  constructor({ code, message, reason = null, domain = null, metadata = {}, violations = [], retryDelayMs = null, cause }) {
    super(`${grpc.status[code] ?? code}: ${message}${reason ? ` [${reason}]` : ''}`, { cause });
    this.name = new.target.name;
    this.code = code;
    this.details = message;
    this.reason = reason;
    this.domain = domain;
    this.metadata = metadata;
    this.violations = violations;
    this.retryDelayMs = retryDelayMs;
  }

  /** True for UNAVAILABLE, the only code vitals marks as safe to retry. */
  get retryable() {
    return this.code === grpc.status.UNAVAILABLE;
  }
}

/** INVALID_ARGUMENT: `violations` lists every offending field. */
export class InvalidArgument extends VitalsError {}
/** NOT_FOUND, reason SYSTEM_NOT_FOUND. */
export class SystemNotFound extends VitalsError {}
/** Base of the lock errors. */
export class LockError extends VitalsError {}
/** ABORTED, reason LOCK_NOT_AVAILABLE: another holder kept the lock for the whole wait. */
export class LockNotAvailable extends LockError {}
/** ABORTED, reason LOCK_LOST: the lease ran out or the lock's session ended while held. */
export class LockLost extends LockError {}
/** FAILED_PRECONDITION, reason LOCK_MODE_MISMATCH: the key is in use as a semaphore of another size, or as a plain lock (metadata.held_as). */
export class LockModeMismatch extends LockError {}
/** NOT_FOUND, reason LOCK_NOT_HELD: nobody holds or waits for the key. */
export class LockNotHeld extends LockError {}
/** UNAVAILABLE (pool exhausted, system busy, database down, shutting down): retry. */
export class Unavailable extends VitalsError {}

const BY_REASON = {
  INVALID_ARGUMENT: InvalidArgument,
  SYSTEM_NOT_FOUND: SystemNotFound,
  LOCK_NOT_AVAILABLE: LockNotAvailable,
  LOCK_LOST: LockLost,
  LOCK_MODE_MISMATCH: LockModeMismatch,
  LOCK_NOT_HELD: LockNotHeld,
};
const BY_CODE = {
  [grpc.status.INVALID_ARGUMENT]: InvalidArgument,
  [grpc.status.UNAVAILABLE]: Unavailable,
};

function decodeDetails(err) {
  const out = { reason: null, domain: null, metadata: {}, violations: [], retryDelayMs: null };
  const raw = err.metadata?.get?.('grpc-status-details-bin')?.[0];
  if (!raw) return out;
  let status;
  try {
    status = Status.decode(raw);
  } catch {
    return out; // undecodable details: keep the code and message
  }
  for (const any of status.details) {
    const type = DETAIL_TYPES[any.type_url];
    if (!type) continue;
    const detail = type.toObject(type.decode(any.value), { longs: Number, defaults: true });
    if (any.type_url.endsWith('ErrorInfo')) {
      Object.assign(out, { reason: detail.reason, domain: detail.domain, metadata: detail.metadata ?? {} });
    } else if (any.type_url.endsWith('BadRequest')) {
      out.violations.push(...detail.field_violations.map((v) => ({ field: v.field, description: v.description })));
    } else if (detail.retry_delay) {
      out.retryDelayMs = detail.retry_delay.seconds * 1000 + detail.retry_delay.nanos / 1e6;
    }
  }
  return out;
}

/**
 * Turns a grpc-js ServiceError (or a stream's 'error') into a VitalsError.
 * @param {import('@grpc/grpc-js').ServiceError} err
 * @returns {VitalsError}
 */
export function fromServiceError(err) {
  if (err instanceof VitalsError) return err;
  const details = decodeDetails(err);
  const Class = BY_REASON[details.reason] ?? BY_CODE[err.code] ?? VitalsError;
  return new Class({ code: err.code ?? grpc.status.UNKNOWN, message: err.details ?? String(err), ...details, cause: err });
}
