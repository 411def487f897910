//! `hitless certs`: a CA of its own, and the certificates it issues, with rcgen
//! (ECDSA P-256). Certificates from any other PKI work as well, if they carry the URI
//! SANs of [`crate::identity`] and chain to the CA in `ca.pem`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::Identity;
use crate::{files, TlsError};

/// How long the CA is valid.
pub const CA_DAYS: i64 = 3650;
/// How long an issued certificate is valid (reissue, and every party reloads it).
pub const LEAF_DAYS: i64 = 365;

fn err(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |source| TlsError::Issue { what: what.to_owned(), source }
}

/// The CA's parameters; `certs issue` rebuilds the same issuer name and key identifier
/// from them and the CA's key.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "hitless CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(CA_DAYS);
    p
}

/// Writes `path` through a temporary file and a rename (a reader never sees half a
/// file), with `mode`.
fn write(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("pem.tmp");
    let wrap = |source| TlsError::Write { path: path.to_owned(), source };
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(wrap)?;
    f.write_all(text.as_bytes()).map_err(wrap)?;
    f.sync_all().map_err(wrap)?;
    std::fs::rename(&tmp, path).map_err(wrap)
}

/// `hitless certs init`: creates `dir` (if needed) with a new CA (`ca.pem`,
/// `ca-key.pem`) and the coordinator's certificate for `sans` plus localhost and
/// 127.0.0.1. Refuses a directory that already holds a CA. Returns the files written.
pub fn init(dir: &Path, sans: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    let ca_path = dir.join(files::CA);
    if ca_path.exists() {
        return Err(TlsError::Invalid(format!(
            "{}: already holds a CA; every certificate issued from it would stop being trusted if it were replaced. Issue more with `hitless certs issue --dir {}`, or give another --dir",
            ca_path.display(),
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;
    let key = KeyPair::generate().map_err(err("the CA's key"))?;
    let cert = ca_params().self_signed(&key).map_err(err("the CA"))?;
    write(&dir.join(files::CA_KEY), &key.serialize_pem(), 0o600)?;
    write(&ca_path, &cert.pem(), 0o644)?;
    let mut written = vec![ca_path, dir.join(files::CA_KEY)];
    let (c, k) = issue_coordinator(dir, sans)?;
    written.extend([c, k]);
    Ok(written)
}

/// Issues the coordinator's certificate (server authentication) for `sans` plus
/// localhost and 127.0.0.1: `coordinator.pem`, `coordinator-key.pem`.
pub fn issue_coordinator(dir: &Path, sans: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let mut names: Vec<SanType> = vec![];
    for host in sans.iter().map(String::as_str).chain(["localhost", "127.0.0.1"]) {
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(|_| {
                TlsError::Invalid(format!(
                    "--san {host:?}: not a host name or an IP address; give e.g. coordinator.example.com or 10.0.0.5"
                ))
            })?),
        };
        if !names.contains(&san) {
            names.push(san);
        }
    }
    leaf(dir, files::COORDINATOR, &Identity::Coordinator, names, ExtendedKeyUsagePurpose::ServerAuth)
}

/// `hitless certs issue`: a client certificate for a node's agent or an operator,
/// `node-NAME.pem` / `operator-NAME.pem` and its key (replaced if present: that is a
/// rotation; every party reloads its files when they change).
pub fn issue(dir: &Path, identity: &Identity) -> Result<(PathBuf, PathBuf), TlsError> {
    let stem = match identity {
        Identity::Node(n) => format!("node-{n}"),
        Identity::Operator { name, .. } => format!("operator-{name}"),
        Identity::Coordinator => return issue_coordinator(dir, &[]),
    };
    leaf(dir, &stem, identity, vec![], ExtendedKeyUsagePurpose::ClientAuth)
}

fn leaf(
    dir: &Path,
    stem: &str,
    identity: &Identity,
    mut sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let ca_key_path = dir.join(files::CA_KEY);
    let ca_key_pem =
        std::fs::read_to_string(&ca_key_path).map_err(|source| TlsError::Read { path: ca_key_path.clone(), source })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(err("reading ca-key.pem"))?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let uri = identity.uri();
    sans.push(SanType::URI(uri.as_str().try_into().map_err(err("the identity URI"))?));
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, identity.to_string());
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(LEAF_DAYS);
    let key = KeyPair::generate().map_err(err(stem))?;
    let cert = p.signed_by(&key, &issuer).map_err(err(stem))?;
    let (cert_path, key_path) = files::pair(dir, stem);
    // The key first: a reader that sees the new certificate before its key keeps the
    // old pair and looks again (a mismatched pair is never used).
    write(&key_path, &key.serialize_pem(), 0o600)?;
    write(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}
