//! The gRPC listener's TLS: a rustls server configuration built from PEM
//! files, swapped whole when they change.
//!
//! Each new connection's handshake takes the configuration current at that
//! moment, so a rotated certificate (or client CA) is served to new
//! connections while established ones keep the session they negotiated.
//! tonic's own `ServerTlsConfig` is fixed when the server starts, which is
//! why the listener ([`crate::listener`]) runs the handshake itself.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use tokio_rustls::rustls::{
    self, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::config::Config;

/// Why the TLS settings or files were refused. `Display` names the variable
/// or the file, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One of the certificate and the key without the other.
    #[error("VITALS_TLS_CERT_FILE and VITALS_TLS_KEY_FILE go together: set both or neither")]
    Incomplete,
    /// A client CA without a server certificate.
    #[error("VITALS_TLS_CLIENT_CA_FILE needs VITALS_TLS_CERT_FILE and VITALS_TLS_KEY_FILE")]
    CaWithoutCertificate,
    /// A file holds no usable PEM of the kind expected.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the certificate, the key or their pairing.
    #[error("the certificate and key are refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA cannot verify clients (no usable certificate in it).
    #[error("the client CA is refused: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
}

/// The PEM files of the listener's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA certificates that issue client certificates; set: mTLS.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files `config` names; `None` when TLS is off.
    pub fn from_config(config: &Config) -> Result<Option<TlsFiles>, TlsError> {
        match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls_client_ca_file.clone(),
            })),
            (None, None) if config.tls_client_ca_file.is_some() => Err(TlsError::CaWithoutCertificate),
            (None, None) => Ok(None),
            _ => Err(TlsError::Incomplete),
        }
    }

    /// Every file, in the order [`Self::build`] takes their contents.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }

    /// The server configuration of the files' `contents` (as read, in the
    /// order of [`Self::paths`]).
    pub fn build(&self, contents: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
        let [cert, key, rest @ ..] = contents else {
            return Err(TlsError::Pem {
                path: self.cert.clone(),
                why: "not read".into(),
            });
        };
        let chain = certificates(&self.cert, cert)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
            path: self.key.clone(),
            why: format!("no usable private key ({e})"),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match (&self.client_ca, rest.first()) {
            (Some(path), Some(ca)) => {
                let mut roots = RootCertStore::empty();
                for certificate in certificates(path, ca)? {
                    roots.add(certificate)?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        // with_single_cert refuses a key that is not the certificate's.
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            why: format!("not PEM certificates ({e})"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            why: "no certificate in the file".into(),
        });
    }
    Ok(chain)
}

/// The configuration new handshakes use, replaced whole by a reload.
#[derive(Debug)]
pub struct TlsSettings {
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsSettings {
    /// Settings starting with `config`.
    pub fn new(config: ServerConfig) -> Arc<TlsSettings> {
        Arc::new(TlsSettings {
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// The configuration for a handshake starting now.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// From now on handshakes use `config`.
    pub fn replace(&self, config: ServerConfig) {
        let config = Arc::new(config);
        match self.current.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

/// What a verified client certificate says about its holder: its DNS and
/// URI SANs (a SPIFFE id is a URI SAN), which `client_cert_san` matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SANs, as written in the certificate.
    pub sans: Arc<[String]>,
}

impl PeerIdentity {
    /// The identity of the leaf certificate `der`; no SANs when it cannot
    /// be parsed (rustls verified it, so that does not happen in practice).
    pub fn of_certificate(der: &[u8]) -> PeerIdentity {
        use x509_parser::extensions::GeneralName;
        let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der) else {
            return PeerIdentity::default();
        };
        let sans = match certificate.subject_alternative_name() {
            Ok(Some(extension)) => extension
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        PeerIdentity { sans: sans.into() }
    }
}

/// The process's crypto provider for rustls users that take the default
/// (sqlx's PostgreSQL TLS). Installing it twice is harmless.
pub fn install_crypto_provider() {
    let _ = CryptoProvider::install_default(rustls::crypto::ring::default_provider());
}
