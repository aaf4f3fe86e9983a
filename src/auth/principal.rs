//! Principals: the callers `VITALS_AUTH_FILE` names, how a request proves it
//! is one, and what each may do.
//!
//! ```toml
//! [[principal]]
//! name = "payments-prober"
//! token_sha256 = "<hex SHA-256 of the bearer token>"
//! client_cert_san = "spiffe://example.org/payments/prober"
//! scopes = ["health.read", "health.write"]
//! systems = ["payments-*"]        # absent: every system
//! lock_keys = ["payments/*"]      # absent: every key
//! ```
//!
//! The file holds digests, never tokens, so reading it does not hand out
//! credentials. A token is compared with every digest in constant time, so
//! the time a refusal takes says nothing about how close a guess was.

use std::{collections::HashSet, sync::Arc};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use crate::domain::{Namespace, Pattern};
use crate::error::{Denied, Error, Missing};

/// What a principal may call, one scope per group of RPCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// EvaluateHealth, GetSystemHealth, ListRuns, ListTransitions, WatchTransitions, ListSystems,
    /// GetUptime.
    HealthRead,
    /// SubmitRun.
    HealthWrite,
    /// ConfigureCheck, DeleteCheck, DeleteSystem, SetMaintenance, ClearMaintenance,
    /// ConfigureSystem.
    HealthAdmin,
    /// WithLock.
    Locks,
}

impl Scope {
    /// Every scope, in the order the README lists them.
    pub const ALL: [Scope; 4] = [Scope::HealthRead, Scope::HealthWrite, Scope::HealthAdmin, Scope::Locks];

    /// The scope's name in the auth file and in `ErrorInfo.metadata.scope`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::HealthRead => "health.read",
            Scope::HealthWrite => "health.write",
            Scope::HealthAdmin => "health.admin",
            Scope::Locks => "locks",
        }
    }

    fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }

    fn bit(self) -> u8 {
        match self {
            Scope::HealthRead => 1,
            Scope::HealthWrite => 2,
            Scope::HealthAdmin => 4,
            Scope::Locks => 8,
        }
    }
}

/// A caller the auth file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its name, in logs and in `ErrorInfo.metadata.principal`.
    pub name: String,
    /// Its scopes, one bit each.
    scopes: u8,
    /// The systems it may read, write or configure.
    pub systems: Namespace,
    /// The lock keys it may take.
    pub lock_keys: Namespace,
}

impl Principal {
    /// Whether it holds `scope`.
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }

    fn denied(&self, missing: Missing) -> Error {
        Error::PermissionDenied(Denied {
            principal: self.name.clone(),
            missing,
        })
    }
}

/// What the handler of a request may do, put into the request's extensions
/// by the auth layer.
#[derive(Debug, Clone)]
pub enum Access {
    /// Authentication is off (no `VITALS_AUTH_FILE`): everything.
    Open,
    /// What this principal may.
    Principal(Arc<Principal>),
}

impl Access {
    /// The access the auth layer granted `request`. A request that did not
    /// pass the layer gets none: a wiring mistake refuses, never opens.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Access, Error> {
        request.extensions().get::<Access>().cloned().ok_or(Error::Invariant(
            "a request reached a handler without the auth layer's access",
        ))
    }

    /// The principal's name, for logs; `-` when authentication is off.
    pub fn name(&self) -> &str {
        match self {
            Access::Open => "-",
            Access::Principal(p) => &p.name,
        }
    }

    /// The systems the caller may use, to filter a listing by.
    pub fn systems(&self) -> &Namespace {
        match self {
            Access::Open => &Namespace::All,
            Access::Principal(p) => &p.systems,
        }
    }

    /// The lock keys the caller may use, to filter a listing by.
    pub fn lock_keys(&self) -> &Namespace {
        match self {
            Access::Open => &Namespace::All,
            Access::Principal(p) => &p.lock_keys,
        }
    }

    /// Whether the caller may read, write or configure `system_id`.
    pub fn may_use_system(&self, system_id: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Principal(p) => p.systems.contains(system_id),
        }
    }

    /// `PERMISSION_DENIED` unless the caller may use `system_id`.
    pub fn check_system(&self, system_id: &str) -> Result<(), Error> {
        match self {
            Access::Principal(p) if !p.systems.contains(system_id) => {
                Err(p.denied(Missing::System(system_id.to_owned())))
            }
            _ => Ok(()),
        }
    }

    /// `PERMISSION_DENIED` unless the caller may take the lock `key`.
    pub fn check_lock_key(&self, key: &str) -> Result<(), Error> {
        match self {
            Access::Principal(p) if !p.lock_keys.contains(key) => Err(p.denied(Missing::LockKey(key.to_owned()))),
            _ => Ok(()),
        }
    }
}

/// One `[[principal]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: String,
    token_sha256: Option<String>,
    client_cert_san: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    systems: Option<Vec<String>>,
    lock_keys: Option<Vec<String>>,
}

/// The whole file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    principal: Vec<RawPrincipal>,
}

/// Why an auth file was not loaded. The message names the principal and
/// the field, never a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthFileError(String);

/// Every principal of an auth file, indexed by credential.
#[derive(Debug, Default)]
pub struct Principals {
    /// SHA-256 digests of bearer tokens and whose they are.
    tokens: Vec<([u8; 32], Arc<Principal>)>,
    /// Client certificate SANs and whose they are.
    sans: Vec<(String, Arc<Principal>)>,
}

impl Principals {
    /// Parses and checks an auth file: every principal named once, with a
    /// credential, known scopes, and patterns that mean what they say.
    pub fn parse(text: &str) -> Result<Principals, AuthFileError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| AuthFileError(format!("not a valid auth file: {e}")))?;
        let mut principals = Principals::default();
        let mut names = HashSet::new();
        for (i, entry) in raw.principal.into_iter().enumerate() {
            let at = |what: String| AuthFileError(format!("principal {} ({:?}): {what}", i + 1, entry.name));
            if entry.name.trim().is_empty() {
                return Err(at("name must not be empty".into()));
            }
            if !names.insert(entry.name.clone()) {
                return Err(at("the name is used twice".into()));
            }
            if entry.token_sha256.is_none() && entry.client_cert_san.is_none() {
                return Err(at("needs token_sha256 or client_cert_san".into()));
            }
            let mut scopes = 0;
            for name in &entry.scopes {
                let scope = Scope::parse(name).ok_or_else(|| {
                    at(format!(
                        "unknown scope {name:?} (known: health.read, health.write, health.admin, locks)"
                    ))
                })?;
                scopes |= scope.bit();
            }
            let principal = Arc::new(Principal {
                name: entry.name.clone(),
                scopes,
                systems: Namespace::parse(entry.systems.clone()).map_err(|e| at(format!("systems: {e}")))?,
                lock_keys: Namespace::parse(entry.lock_keys.clone()).map_err(|e| at(format!("lock_keys: {e}")))?,
            });
            if let Some(hex_digest) = &entry.token_sha256 {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(hex_digest.trim(), &mut digest)
                    .map_err(|_| at("token_sha256 must be 64 hexadecimal digits (sha256sum of the token)".into()))?;
                if principals.tokens.iter().any(|(d, _)| *d == digest) {
                    return Err(at("token_sha256 is another principal's too".into()));
                }
                principals.tokens.push((digest, principal.clone()));
            }
            if let Some(san) = &entry.client_cert_san {
                if san.is_empty() {
                    return Err(at("client_cert_san must not be empty".into()));
                }
                if principals.sans.iter().any(|(s, _)| s == san) {
                    return Err(at("client_cert_san is another principal's too".into()));
                }
                principals.sans.push((san.clone(), principal));
            }
        }
        Ok(principals)
    }

    /// How many principals the file names.
    pub fn len(&self) -> usize {
        let mut names: HashSet<&str> = self.tokens.iter().map(|(_, p)| p.name.as_str()).collect();
        names.extend(self.sans.iter().map(|(_, p)| p.name.as_str()));
        names.len()
    }

    /// Whether the file names no principal (every request is refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The principal whose token this is. Every digest is compared, each in
    /// constant time, whichever matches.
    pub fn by_token(&self, token: &[u8]) -> Option<Arc<Principal>> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for (known, principal) in &self.tokens {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(principal.clone());
            }
        }
        found
    }

    /// The principal one of a verified client certificate's SANs names (the
    /// first SAN that names one).
    pub fn by_san<'a>(&self, sans: impl IntoIterator<Item = &'a str>) -> Option<Arc<Principal>> {
        sans.into_iter()
            .find_map(|san| self.sans.iter().find(|(known, _)| known == san).map(|(_, p)| p.clone()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn file() -> String {
        format!(
            r#"
            [[principal]]
            name = "writer"
            token_sha256 = "{}"
            scopes = ["health.read", "health.write"]
            systems = ["payments-*", "checkout"]

            [[principal]]
            name = "locker"
            client_cert_san = "spiffe://example.org/locker"
            scopes = ["locks"]
            lock_keys = ["payments/*"]
            "#,
            sha("s3cret")
        )
    }

    #[test]
    fn a_token_names_its_principal_and_an_unknown_token_none() {
        let principals = Principals::parse(&file()).unwrap();
        assert_eq!(principals.len(), 2);
        let writer = principals.by_token(b"s3cret").unwrap();
        assert_eq!(writer.name, "writer");
        assert!(writer.has(Scope::HealthRead) && writer.has(Scope::HealthWrite));
        assert!(!writer.has(Scope::HealthAdmin) && !writer.has(Scope::Locks));
        assert!(principals.by_token(b"s3cret ").is_none());
        assert!(principals.by_token(b"").is_none());
    }

    #[test]
    fn a_san_names_its_principal() {
        let principals = Principals::parse(&file()).unwrap();
        let locker = principals.by_san(["localhost", "spiffe://example.org/locker"]).unwrap();
        assert_eq!(locker.name, "locker");
        assert!(principals.by_san(["spiffe://example.org/other"]).is_none());
    }

    #[test]
    fn namespaces_are_exact_names_or_prefixes_and_absent_means_all() {
        let principals = Principals::parse(&file()).unwrap();
        let writer = Access::Principal(principals.by_token(b"s3cret").unwrap());
        assert!(writer.check_system("payments-eu").is_ok());
        assert!(writer.check_system("payments-").is_ok());
        assert!(writer.check_system("checkout").is_ok());
        assert!(writer.check_system("checkout-2").is_err());
        assert!(writer.check_system("payment").is_err());
        assert!(writer.check_lock_key("anything").is_ok(), "no lock_keys: every key");
        let locker = Access::Principal(principals.by_san(["spiffe://example.org/locker"]).unwrap());
        assert!(locker.check_lock_key("payments/nightly").is_ok());
        let Err(Error::PermissionDenied(denied)) = locker.check_lock_key("billing/nightly") else {
            panic!("billing/nightly is outside the locker's keys");
        };
        assert_eq!(denied.principal, "locker");
        assert_eq!(denied.missing, Missing::LockKey("billing/nightly".into()));
        assert!(Access::Open.check_system("x").is_ok() && Access::Open.check_lock_key("y").is_ok());
    }

    #[test]
    fn mistakes_in_the_file_are_refused_with_the_principal_named() {
        for (text, expected) in [
            (
                "[[principal]]\nname = \"a\"\nscopes = []",
                "needs token_sha256 or client_cert_san",
            ),
            (
                "[[principal]]\nname = \"a\"\ntoken_sha256 = \"abc\"",
                "64 hexadecimal digits",
            ),
            (
                "[[principal]]\nname = \"a\"\nclient_cert_san = \"x\"\nscopes = [\"health.everything\"]",
                "unknown scope",
            ),
            (
                "[[principal]]\nname = \"a\"\nclient_cert_san = \"x\"\nsystems = [\"a*b\"]",
                "may only end a pattern",
            ),
            (
                "[[principal]]\nname = \"a\"\nclient_cert_san = \"x\"\n[[principal]]\nname = \"a\"\nclient_cert_san = \"y\"",
                "used twice",
            ),
            (
                "[[principal]]\nname = \"a\"\nclient_cert_san = \"x\"\n[[principal]]\nname = \"b\"\nclient_cert_san = \"x\"",
                "another principal's",
            ),
            (
                "[[principal]]\nname = \"a\"\nclient_cert_san = \"x\"\ntoken = \"plain\"",
                "unknown field",
            ),
            ("not toml at all [", "not a valid auth file"),
        ] {
            let err = Principals::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
