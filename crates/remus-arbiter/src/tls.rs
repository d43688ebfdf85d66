//! TLS to etcd: the PEM files, checked when they are given; the TLS
//! settings of each endpoint's connection; and plain words for what went
//! wrong in a handshake.
//!
//! The arbiter trusts only the CA it is given (`--arbiter-ca`), never the
//! system's store: an etcd cluster's certificates come from its own CA,
//! and a public CA must not be able to vouch for an arbiter.
//!
//! Refusals of this host's client certificate arrive after the handshake
//! in TLS 1.3, and tonic then reports only a closed connection. So when a
//! connection to an https endpoint fails without a reason, [`Tls::probe`]
//! makes one handshake of its own with the same settings and reads the
//! member's alert.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, AlertDescription, CertificateError, ClientConfig, RootCertStore};

use crate::{ArbiterError, TlsFiles};

/// Longest PEM file read (certificates and keys are a few KiB).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// TLS settings for etcd endpoints, from checked files.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The same settings for [`Tls::probe`].
    probe: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.files.ca)
            .field("cert", &self.files.cert)
            .field("key", &self.files.key)
            .finish()
    }
}

impl Tls {
    /// Reads and checks `files`: a CA with at least one usable
    /// certificate, and a client certificate with the key that matches
    /// it (both or neither). Errors name the file.
    pub(crate) fn load(files: &TlsFiles) -> Result<Tls, ArbiterError> {
        let Some(ca_path) = &files.ca else {
            return Err(ArbiterError::Config(
                "TLS to etcd needs the CA that signed the members' certificates (--arbiter-ca): \
                 the arbiter trusts no other, not the system's"
                    .into(),
            ));
        };
        let ca = read_pem(ca_path, "CA")?;
        let mut roots = RootCertStore::empty();
        for cert in certificates(&ca, ca_path, "CA")? {
            roots.add(cert).map_err(|e| ArbiterError::TlsFile {
                what: "CA",
                path: ca_path.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ArbiterError::Runtime(format!("TLS settings: {e}")))?
            .with_root_certificates(roots);
        let (mut probe, identity) = match (&files.cert, &files.key) {
            (Some(cert_path), Some(key_path)) => {
                let cert = read_pem(cert_path, "certificate")?;
                let chain = certificates(&cert, cert_path, "certificate")?;
                let key = crate::auth::read_private(key_path, MAX_PEM_BYTES, "a PEM file")
                    .map_err(|reason| ArbiterError::TlsFile {
                        what: "key",
                        path: key_path.clone(),
                        reason,
                    })?;
                let der = PrivateKeyDer::from_pem_slice(&key).map_err(|e| ArbiterError::TlsFile {
                    what: "key",
                    path: key_path.clone(),
                    reason: format!(
                        "no private key in it (PEM 'PRIVATE KEY', 'EC PRIVATE KEY' or 'RSA PRIVATE KEY' expected): {e}"
                    ),
                })?;
                let config = builder.with_client_auth_cert(chain, der).map_err(|e| {
                    let reason = match e {
                        rustls::Error::InconsistentKeys(_) => {
                            format!("does not belong to the certificate {}", cert_path.display())
                        }
                        other => format!("cannot be used with {}: {other}", cert_path.display()),
                    };
                    ArbiterError::TlsFile {
                        what: "key",
                        path: key_path.clone(),
                        reason,
                    }
                })?;
                (config, Some((cert, key)))
            }
            (None, None) => (builder.with_no_client_auth(), None),
            _ => {
                return Err(ArbiterError::Config(
                    "a client certificate needs its key and the key its certificate \
                     (--arbiter-cert with --arbiter-key)"
                        .into(),
                ));
            }
        };
        probe.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Tls {
            files: files.clone(),
            ca,
            identity,
            probe: Arc::new(probe),
        })
    }

    /// The files these settings came from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// etcd-client's settings for a connection to `host` (the endpoint's
    /// host, an IPv6 address without its brackets): the certificate must
    /// name it (a DNS name, or an IP address among its subject alternative
    /// names).
    pub(crate) fn options_for(&self, host: &str, handshake: Duration) -> etcd_client::TlsOptions {
        let mut o = etcd_client::TlsOptions::new()
            .domain_name(host)
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca))
            .timeout(handshake);
        if let Some((cert, key)) = &self.identity {
            o = o.identity(etcd_client::Identity::from_pem(cert, key));
        }
        o
    }

    /// Plain words for a TLS error of the handshake with an endpoint.
    pub(crate) fn describe(&self, e: &rustls::Error) -> String {
        let ca = self.files.ca.as_deref().unwrap_or(Path::new("?")).display();
        match e {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                format!("the member's certificate is not signed by the CA in {ca} (--arbiter-ca)")
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "{e}: the endpoint URL must use a name or IP address that the member's \
                 certificate lists among its subject alternative names"
            ),
            rustls::Error::AlertReceived(a) => self.describe_alert(*a),
            other => format!("{other}"),
        }
    }

    fn describe_alert(&self, a: AlertDescription) -> String {
        match &self.files.cert {
            None => format!(
                "the member asks for a client certificate and this host gave none \
                 (TLS alert {a:?}): give --arbiter-cert and --arbiter-key"
            ),
            Some(cert) => format!(
                "the member refused this host's client certificate {} (TLS alert {a:?}): \
                 it must be signed by a CA the members trust (etcd --trusted-ca-file)",
                cert.display()
            ),
        }
    }

    /// Why `host:port` (its authority, `[v6]:port` with brackets) closes
    /// TLS connections, if a handshake of our own finds out within
    /// `limit`: `None` when it connects fine, or cannot connect at all.
    pub(crate) async fn probe(
        &self,
        host: &str,
        authority: &str,
        limit: Duration,
    ) -> Option<String> {
        let name = ServerName::try_from(host.to_string()).ok()?;
        let connector = tokio_rustls::TlsConnector::from(self.probe.clone());
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
            let mut tls = match connector.connect(name, tcp).await {
                Ok(s) => s,
                Err(e) => return rustls_error(&e).map(|r| self.describe(r)),
            };
            // HTTP/2's preface and an empty SETTINGS frame: a member that
            // accepts us answers with its own SETTINGS; one that refused
            // our certificate answers with an alert.
            let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            if let Err(e) = tls.write_all(&hello).await {
                return rustls_error(&e).map(|r| self.describe(r));
            }
            let mut buf = [0u8; 64];
            match tls.read(&mut buf).await {
                Ok(0) => Some(
                    "the member closed the connection right after the TLS handshake \
                     (did it refuse this host's client certificate?)"
                        .to_string(),
                ),
                Ok(_) => None,
                Err(e) => rustls_error(&e).map(|r| self.describe(r)),
            }
        };
        tokio::time::timeout(limit, attempt).await.ok().flatten()
    }
}

/// The rustls error somewhere in `e`'s chain of sources (an I/O error
/// carrying it counts).
pub(crate) fn rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if let Some(r) = x.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = x
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        cur = x.source();
    }
    None
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, ArbiterError> {
    use std::io::Read;
    let err = |reason: String| ArbiterError::TlsFile {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(err(format!(
            "larger than {} KiB: not a PEM file",
            MAX_PEM_BYTES / 1024
        )));
    }
    Ok(bytes)
}

/// The certificates of a PEM file: at least one.
fn certificates(
    pem: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ArbiterError> {
    let err = |reason: String| ArbiterError::TlsFile {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "no certificate in it (PEM 'BEGIN CERTIFICATE' expected)".into(),
        ));
    }
    Ok(certs)
}
