//! The WithLock messages a client sends, shared by the lock test modules.

use std::time::Duration;

use tonic::transport::Channel;
use vitals::proto::{self, lock_service_client::LockServiceClient, with_lock_request::Action};

/// A LockService client on a test server.
pub type LockClient = LockServiceClient<Channel>;

/// `acquire` of `key`, waiting at most `wait` (`None`: the server's default).
pub fn acquire(key: &str, wait: Option<Duration>) -> proto::WithLockRequest {
    proto::WithLockRequest {
        action: Some(Action::Acquire(proto::Acquire {
            key: key.into(),
            wait_timeout: wait.map(|d| prost_types::Duration::try_from(d).expect("a representable duration")),
            owner: "vitals integration tests".into(),
        })),
    }
}

/// `keep_alive`.
pub fn keep_alive() -> proto::WithLockRequest {
    proto::WithLockRequest {
        action: Some(Action::KeepAlive(proto::KeepAlive {})),
    }
}

/// `release`.
pub fn release() -> proto::WithLockRequest {
    proto::WithLockRequest {
        action: Some(Action::Release(proto::Release {})),
    }
}
