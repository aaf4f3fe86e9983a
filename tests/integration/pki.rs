//! Certificates the tests make for themselves (rcgen): CAs, server and
//! client certificates, and the files vitals reads them from. Nothing here
//! is ever written outside a test's temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn issue(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose, expired: bool) -> Issued {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, "vitals test");
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        self.issue(
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        )
    }

    /// A client certificate with the URI SAN `uri` (a SPIFFE id, say).
    pub fn client(&self, uri: &str) -> Issued {
        self.issue(
            vec![SanType::URI(uri.try_into().unwrap())],
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        )
    }

    /// A client certificate that expired in 2021.
    pub fn expired_client(&self, uri: &str) -> Issued {
        self.issue(
            vec![SanType::URI(uri.try_into().unwrap())],
            ExtendedKeyUsagePurpose::ClientAuth,
            true,
        )
    }

    /// A client configuration trusting this CA for the server `localhost`.
    pub fn trusted_by_client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.pem))
            .domain_name("localhost")
    }
}

impl Issued {
    /// `tls` presenting this certificate.
    pub fn presented(&self, tls: ClientTlsConfig) -> ClientTlsConfig {
        tls.identity(Identity::from_pem(&self.cert, &self.key))
    }
}

/// The files of a server's TLS in a directory of the test.
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl ServerFiles {
    /// Writes `server` (and `client_ca`, when given) into `dir`.
    pub fn write(dir: &Path, server: &Issued, client_ca: Option<&Ca>) -> ServerFiles {
        let files = ServerFiles {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            client_ca: dir.join("client-ca.crt"),
        };
        files.replace(server);
        if let Some(ca) = client_ca {
            std::fs::write(&files.client_ca, &ca.pem).unwrap();
        }
        files
    }

    /// Replaces the certificate and key, the key first, each file whole.
    pub fn replace(&self, server: &Issued) {
        write_whole(&self.key, &server.key);
        write_whole(&self.cert, &server.cert);
    }

    /// The flags of a server using these files (with the client CA: mTLS).
    pub fn flags(&self, mtls: bool) -> Vec<String> {
        let mut flags = vec![
            "--tls-cert-file".to_owned(),
            self.cert.display().to_string(),
            "--tls-key-file".to_owned(),
            self.key.display().to_string(),
            "--file-reload-interval-ms".to_owned(),
            "50".to_owned(),
        ];
        if mtls {
            flags.push("--tls-client-ca-file".to_owned());
            flags.push(self.client_ca.display().to_string());
        }
        flags
    }
}

/// Writes `contents` to `path` by renaming a complete file over it, so a
/// reader sees the old or the new file, never half of one.
pub fn write_whole(path: &Path, contents: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// The flags as `&str`, for [`crate::harness::TestApp::start`].
pub fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}
