//! Throwaway certificates for tests that talk TLS (etcd with client
//! certificates): made fresh at test time, written under a directory the
//! test owns, never committed.
//!
//! Made with the `rcgen` crate rather than by shelling out to `openssl`:
//! it is pure Rust (no tool to find, no config file or command line that
//! differs between OpenSSL versions), gives typed errors, builds on `ring`
//! which the TLS stack already compiles, and is well kept (rustls's own
//! tests use it).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test CA and the certificates it signed, plus a second, untrusted
/// CA with a client certificate of its own (to prove refusal).
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate that servers and clients trust.
    pub ca: PathBuf,
    /// The server's certificate: subject alternative names = the IPs it
    /// was made for (nothing else, so a host name does not match it).
    pub server: CertFiles,
    /// The client certificate for remus agents (CN `remus-agent`, which
    /// is no etcd user name: with etcd's `--client-cert-auth` and
    /// authentication both on, a certificate's CN is taken as a user name
    /// when no password is given).
    pub client: CertFiles,
    /// A client certificate for the test's own administration (etcdctl),
    /// CN `etcd-admin`.
    pub admin: CertFiles,
    /// The other CA, trusted by nobody.
    pub rogue_ca: PathBuf,
    /// A client certificate with the agents' CN, signed by the rogue CA.
    pub rogue_client: CertFiles,
}

impl TestPki {
    /// Makes the CAs and certificates in `dir` (created if needed): the
    /// server certificate names `server_ips`. Keys are written mode 0600.
    pub fn generate(dir: &Path, server_ips: &[IpAddr]) -> Result<TestPki> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let (ca_cert, ca) = make_ca("remus-test CA")?;
        let ca_path = dir.join("ca.pem");
        write(&ca_path, &ca_cert, false)?;
        let (rogue_cert, rogue) = make_ca("remus-test rogue CA")?;
        let rogue_path = dir.join("rogue-ca.pem");
        write(&rogue_path, &rogue_cert, false)?;

        // etcd 3.4's gRPC gateway dials its own client port with the
        // server certificate as its client certificate: without the
        // client-auth usage too, every start logs TLS refusals.
        let server = leaf(
            dir,
            "server",
            "etcd-server",
            server_ips.iter().map(|ip| ip.to_string()).collect(),
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            &ca,
        )?;
        let client_eku = [ExtendedKeyUsagePurpose::ClientAuth];
        let client = leaf(dir, "client", "remus-agent", vec![], &client_eku, &ca)?;
        let admin = leaf(dir, "admin", "etcd-admin", vec![], &client_eku, &ca)?;
        let rogue_client = leaf(
            dir,
            "rogue-client",
            "remus-agent",
            vec![],
            &client_eku,
            &rogue,
        )?;
        Ok(TestPki {
            ca: ca_path,
            server,
            client,
            admin,
            rogue_ca: rogue_path,
            rogue_client,
        })
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A self-signed CA: its certificate (PEM) and the issuer that signs
/// with its key.
fn make_ca(cn: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().context("CA key")?;
    let cert = params.self_signed(&key).context("self-sign the CA")?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// A certificate for `cn` and `sans` signed by `ca`, written to
/// `dir/STEM.pem` and its key to `dir/STEM-key.pem`.
fn leaf(
    dir: &Path,
    stem: &str,
    cn: &str,
    sans: Vec<String>,
    eku: &[ExtendedKeyUsagePurpose],
    ca: &Issuer<'_, KeyPair>,
) -> Result<CertFiles> {
    let mut params = CertificateParams::new(sans).context("certificate names")?;
    params.distinguished_name = name(cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = eku.to_vec();
    let key = KeyPair::generate().with_context(|| format!("{stem} key"))?;
    let cert = params
        .signed_by(&key, ca)
        .with_context(|| format!("sign the {stem} certificate"))?;
    let files = CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    };
    write(&files.cert, &cert.pem(), false)?;
    write(&files.key, &key.serialize_pem(), true)?;
    Ok(files)
}

fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_pem_files_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path(), &["127.0.0.1".parse().unwrap()]).unwrap();
        for f in [&pki.ca, &pki.server.cert, &pki.client.cert, &pki.rogue_ca] {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{f:?}");
        }
        for f in [&pki.server.key, &pki.client.key, &pki.rogue_client.key] {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{f:?}");
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f:?}");
        }
    }
}
