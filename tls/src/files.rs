//! The TLS directory: one CA, and one certificate and key per identity.
//!
//! | file | what |
//! | --- | --- |
//! | `ca.pem`, `ca-key.pem` | the CA every party trusts (the key only where certificates are issued) |
//! | `coordinator.pem`, `coordinator-key.pem` | the coordinator's server certificate |
//! | `node-NAME.pem`, `node-NAME-key.pem` | the agent of node NAME |
//! | `operator-NAME.pem`, `operator-NAME-key.pem` | a person or tool (the CLI's `--identity operator-NAME`) |
//!
//! `ca.pem` may hold several CA certificates (during a CA rotation, the old and the new).

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// The CA certificate(s) file.
pub const CA: &str = "ca.pem";
/// The CA's key file.
pub const CA_KEY: &str = "ca-key.pem";
/// The coordinator's identity (file stem).
pub const COORDINATOR: &str = "coordinator";

/// `DIR/STEM.pem` and `DIR/STEM-key.pem`.
pub fn pair(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Every certificate in a PEM file (at least one).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), what: format!("not a PEM certificate file: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "holds no certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: format!("holds no private key (-----BEGIN PRIVATE KEY-----): {e}"),
    })
}

/// The roots of trust in a CA file.
pub fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| TlsError::Pem { path: path.to_owned(), what: format!("not a usable CA certificate: {e}") })?;
    }
    Ok(store)
}

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(paths: &[PathBuf]) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let [cert, key_path] = paths else {
        return Err(TlsError::Invalid("a certificate and a key file".into()));
    };
    let chain = certs(cert)?;
    let key = key(key_path)?;
    let ck = rustls::sign::CertifiedKey::from_der(chain, key, &crate::provider()).map_err(|source| {
        TlsError::Rustls { what: format!("{} with {}", cert.display(), key_path.display()), source }
    })?;
    Ok(ck)
}
