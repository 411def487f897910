//! Just enough DER to read the URI subject alternative names of an X.509 certificate
//! (RFC 5280): the certificate was already verified against the CA by webpki, this only
//! finds the names in it. Malformed input yields no names, never a panic.

/// One tag-length-value: its tag, its contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The contents of a value of tag `want` at the start of `input`, and what follows.
fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, body, rest) = tlv(input)?;
    (tag == want).then_some((body, rest))
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// [3] EXPLICIT, constructed: the extensions of a TBSCertificate.
const EXTENSIONS: u8 = 0xa3;
/// [6] IMPLICIT IA5String: a GeneralName's uniformResourceIdentifier.
const URI: u8 = 0x86;
/// 2.5.29.17, subjectAltName.
const SUBJECT_ALT_NAME: [u8; 3] = [0x55, 0x1d, 0x11];

/// The URI SANs of the DER certificate `cert` (none when it has none or is malformed).
pub fn uri_sans(cert: &[u8]) -> Vec<String> {
    uri_sans_inner(cert).unwrap_or_default()
}

fn uri_sans_inner(cert: &[u8]) -> Option<Vec<String>> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (mut tbs, _) = expect(certificate, SEQUENCE)?;
    // version [0], serial, signature, issuer, validity, subject, spki, then optional
    // [1] and [2] unique ids and [3] extensions: skip to [3].
    let extensions = loop {
        let (tag, body, rest) = tlv(tbs)?;
        if tag == EXTENSIONS {
            break body;
        }
        tbs = rest;
    };
    let (mut list, _) = expect(extensions, SEQUENCE)?;
    let mut uris = Vec::new();
    while !list.is_empty() {
        let (ext, rest) = expect(list, SEQUENCE)?;
        list = rest;
        let (oid, mut ext) = expect(ext, OID)?;
        if oid != SUBJECT_ALT_NAME {
            continue;
        }
        if let Some((_, after)) = expect(ext, BOOLEAN) {
            ext = after;
        }
        let (value, _) = expect(ext, OCTET_STRING)?;
        let (mut names, _) = expect(value, SEQUENCE)?;
        while !names.is_empty() {
            let (tag, body, rest) = tlv(names)?;
            names = rest;
            if tag == URI {
                uris.push(std::str::from_utf8(body).ok()?.to_owned());
            }
        }
    }
    Some(uris)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = uri_sans(&bytes);
        }

        #[test]
        fn a_truncated_certificate_never_panics(cut in 0usize..4096) {
            let cert = crate::test_certs::node_cert("a");
            let _ = uri_sans(&cert[..cut.min(cert.len())]);
        }
    }

    #[test]
    fn finds_the_uri_sans_of_an_issued_certificate() {
        assert_eq!(uri_sans(&crate::test_certs::node_cert("node-a")), vec!["spiffe://hitless/node/node-a".to_owned()]);
    }
}
