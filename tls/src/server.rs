//! The coordinator's side: a rustls server configuration that requires a client
//! certificate from the CA in `ca.pem`, presents `coordinator.pem`, and reloads both
//! when their files change; and the connections it accepts, each carrying the verified
//! [`Peer`] identity into every request's extensions (`Request::extensions().get::<Peer>()`).

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use crate::identity::Identity;
use crate::reload::Reloading;
use crate::{files, TlsError};

/// Longest a client gets to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's TLS: its certificate and the CA it checks clients against, both
/// reloaded on change.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Loads `DIR/ca.pem` and `DIR/coordinator.pem` with its key.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let (cert, key) = files::pair(dir, files::COORDINATOR);
        Self::from_files(&dir.join(files::CA), &cert, &key)
    }

    /// Loads the CA, the certificate and the key from these files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let certified =
            Reloading::new("the server certificate", vec![cert.to_owned(), key.to_owned()], files::certified_key)?;
        let verifier = Reloading::new("the client CA", vec![ca.to_owned()], client_verifier)?;
        let mut config = rustls::ServerConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls { what: "the server's protocol versions".into(), source })?
            .with_client_cert_verifier(Arc::new(ReloadingClientVerifier(verifier)))
            .with_cert_resolver(Arc::new(ReloadingCert(certified)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { config: Arc::new(config) })
    }
}

fn client_verifier(paths: &[std::path::PathBuf]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let roots = files::roots(&paths[0])?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::provider()).build().map_err(|e| {
        TlsError::Invalid(format!("{}: cannot check client certificates against it: {e}", paths[0].display()))
    })
}

#[derive(Debug)]
struct ReloadingCert(Reloading<CertifiedKey>);

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

#[derive(Debug)]
struct ReloadingClientVerifier(Reloading<Arc<dyn ClientCertVerifier>>);

impl ClientCertVerifier for ReloadingClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients present their one certificate anyway.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.current().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().supported_verify_schemes()
    }
}

/// Who is at the other end of a connection, put in every request's extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS with a verified client certificate (false:
    /// `--insecure` plaintext on loopback, where every request is allowed).
    pub tls: bool,
    /// The hitless identity in the client certificate's URI SANs (`None`: plaintext, or
    /// a certificate from the CA that names no hitless identity).
    pub identity: Option<Identity>,
    /// The certificate's URI SANs, for logs.
    pub uris: Vec<String>,
}

impl Peer {
    /// How logs name the peer: its identity, or its URI SANs and address.
    pub fn describe(&self) -> String {
        match (&self.identity, self.tls) {
            (Some(id), _) => format!("{id} (certificate {}, from {})", id.uri(), self.addr),
            (None, true) => {
                format!("a certificate with no hitless identity (URI SANs {:?}, from {})", self.uris, self.addr)
            }
            (None, false) => format!("a plaintext client at {}", self.addr),
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection, plain or TLS, with its [`Peer`].
pub struct Conn {
    io: Io,
    peer: Peer,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, with TLS when `tls` is given (each handshake
/// in its own task, bounded by [`HANDSHAKE_TIMEOUT`]; a refused one is logged and
/// dropped), as the incoming stream of `Server::serve_with_incoming*`.
pub fn incoming(listener: TcpListener, tls: Option<ServerTls>) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.config));
    tokio::spawn(async move {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Replies are small and latency-bound (drain barriers, deltas): no Nagle delay.
            let _ = stream.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                let peer = Peer { addr, tls: false, identity: None, uris: Vec::new() };
                if tx.send(Ok(Conn { io: Io::Plain(stream), peer })).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        info!(%addr, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        info!(%addr, "TLS handshake not finished in time: closed");
                        return;
                    }
                };
                let uris = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| crate::der::uri_sans(c))
                    .unwrap_or_default();
                let identity = Identity::from_uris(uris.iter().map(String::as_str));
                let peer = Peer { addr, tls: true, identity, uris };
                debug!(peer = %peer.describe(), "TLS connection");
                let _ = tx.send(Ok(Conn { io: Io::Tls(Box::new(tls)), peer })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
