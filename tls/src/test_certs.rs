//! Certificates for this crate's tests, issued into a fresh directory.

use std::path::PathBuf;

use crate::identity::Identity;

/// A fresh directory with a CA and the coordinator's certificate.
pub fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hitless-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::issue::init(&dir, &[]).expect("certs init");
    dir
}

/// The DER of a node certificate.
pub fn node_cert(node: &str) -> Vec<u8> {
    let dir = dir(&format!("der-{node}"));
    let (cert, _) = crate::issue::issue(&dir, &Identity::Node(node.into())).expect("issue");
    let der = crate::files::certs(&cert).expect("read").remove(0).to_vec();
    let _ = std::fs::remove_dir_all(&dir);
    der
}
