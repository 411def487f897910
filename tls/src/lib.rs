//! Mutual TLS for every hitless gRPC connection: the coordinator's server side
//! ([`server`]), the agents' and the CLI's client side ([`client`]), the identities
//! certificates carry ([`identity`]), and, with the `issue` feature, a CA and the
//! certificates it issues ([`issue`], `hitless certs`).
//!
//! Everything is rustls with ring: no OpenSSL. Certificates, keys and the CA are read
//! from one directory (see [`files`]) and read again when they change.
//!
//! Plaintext exists for development and tests only, chosen with `--insecure`, and only
//! between loopback addresses ([`require_loopback`]).

pub mod client;
mod der;
pub mod files;
pub mod identity;
#[cfg(any(test, feature = "issue"))]
pub mod issue;
pub mod limits;
mod reload;
pub mod server;
#[cfg(test)]
mod test_certs;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

pub use client::ClientTls;
pub use identity::{Identity, Role};
pub use reload::CHECK_EVERY;
pub use server::{Conn, Peer, ServerTls};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: cannot read the file: {source}; create it with `hitless certs init|issue --dir DIR`, or point --tls-dir at the directory that holds it", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("{}: cannot write the file: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the kind wanted.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong, and the fix.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("{what}: {source}")]
    Rustls {
        /// What was being built.
        what: String,
        /// Cause.
        source: rustls::Error,
    },
    /// A name or an address is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Issuing a certificate failed.
    #[cfg(any(test, feature = "issue"))]
    #[error("issuing {what}: {source}")]
    Issue {
        /// What was being issued.
        what: String,
        /// Cause.
        source: rcgen::Error,
    },
}

/// The process-wide crypto provider: ring.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether `ip` is a loopback address (127.0.0.0/8, ::1, or ::ffff:127.x.y.z).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Refuses `--insecure` (plaintext) for a listen address that is not loopback.
pub fn require_loopback(addr: SocketAddr, flag: &str) -> Result<(), TlsError> {
    if is_loopback(addr.ip()) {
        Ok(())
    } else {
        Err(TlsError::Invalid(format!(
            "{flag} {addr}: --insecure (plaintext gRPC) is allowed on loopback addresses only; listen on 127.0.0.1, or drop --insecure and give --tls-dir DIR (create it with `hitless certs init --dir DIR --san HOST`)"
        )))
    }
}

/// Checks a coordinator URL against the transport chosen: `https://` with `--tls-dir`;
/// `http://` with `--insecure`, to a loopback host only. `flag` names the URL's flag.
pub fn check_url(url: &str, tls: bool, flag: &str) -> Result<(), TlsError> {
    let uri: http::Uri = url.parse().map_err(|_| {
        TlsError::Invalid(format!("{flag} {url:?}: not a URL; give one such as https://coordinator:7070"))
    })?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    match (uri.scheme_str(), tls) {
        (Some("https"), true) => Ok(()),
        (Some("http"), false) => {
            let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(is_loopback);
            if loopback {
                Ok(())
            } else {
                Err(TlsError::Invalid(format!(
                    "{flag} {url}: --insecure (plaintext gRPC) is allowed to a loopback address only; use https:// with --tls-dir DIR (and the CLI's --identity operator-NAME)"
                )))
            }
        }
        (Some("http"), true) => Err(TlsError::Invalid(format!(
            "{flag} {url}: with --tls-dir the coordinator's URL starts with https://"
        ))),
        (Some("https"), false) => Err(TlsError::Invalid(format!(
            "{flag} {url}: an https:// URL needs --tls-dir DIR (with ca.pem and this identity's certificate)"
        ))),
        _ => Err(TlsError::Invalid(format!(
            "{flag} {url:?}: give https://HOST:PORT (with --tls-dir) or, on loopback with --insecure, http://127.0.0.1:PORT"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_for_loopback_only() {
        assert!(require_loopback("127.0.0.1:7070".parse().expect("addr"), "--listen").is_ok());
        assert!(require_loopback("[::1]:7070".parse().expect("addr"), "--listen").is_ok());
        let e = require_loopback("0.0.0.0:7070".parse().expect("addr"), "--listen").expect_err("refused");
        assert!(e.to_string().contains("--insecure") && e.to_string().contains("--tls-dir"), "{e}");
        assert!(check_url("http://127.0.0.1:7070", false, "--coordinator").is_ok());
        assert!(check_url("http://localhost:7070", false, "--coordinator").is_ok());
        assert!(check_url("http://[::1]:7070", false, "--coordinator").is_ok());
        assert!(check_url("http://10.0.0.1:7070", false, "--coordinator").is_err());
        assert!(check_url("https://10.0.0.1:7070", true, "--coordinator").is_ok());
        assert!(check_url("http://10.0.0.1:7070", true, "--coordinator").is_err());
        assert!(check_url("https://127.0.0.1:7070", false, "--coordinator").is_err());
    }
}
