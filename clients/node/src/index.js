// vitals client for Node: health-check evaluation and distributed advisory
// locks over gRPC (package vitals.v1).
//
// Layout:
//   client.js  VitalsClient: submitRun, evaluateHealth, getSystemHealth,
//              withLock, withSharedLock, withSemaphore, campaign and
//              observe; the conversions at the edge
//   errors.js  VitalsError and its subclasses, decoded from the ErrorInfo in
//              grpc-status-details-bin

export { VitalsClient, PROTO_DIR, KEEPALIVE_FRACTION } from './client.js';
export {
  ERROR_DOMAIN,
  VitalsError,
  InvalidArgument,
  SystemNotFound,
  LockError,
  LockNotAvailable,
  LockLost,
  LockModeMismatch,
  LockNotHeld,
  Unavailable,
  fromServiceError,
} from './errors.js';
