//! The agents' and the CLI's side: a rustls client configuration that checks the
//! coordinator against `ca.pem` and presents this party's certificate, both reloaded
//! when their files change; and [`Transport`], which dials a gRPC channel with it (or
//! in plaintext, with `--insecure`, to loopback only).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::reload::Reloading;
use crate::{files, TlsError};

/// This party's TLS: the CA it checks the coordinator against and its own certificate,
/// both reloaded on change.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Loads `DIR/ca.pem` and `DIR/STEM.pem` with `DIR/STEM-key.pem` (STEM: `node-NAME`
    /// for an agent, `operator-NAME` for a person or tool).
    pub fn load(dir: &Path, stem: &str) -> Result<Self, TlsError> {
        let (cert, key) = files::pair(dir, stem);
        Self::from_files(&dir.join(files::CA), &cert, &key)
    }

    /// Loads the CA, the certificate and the key from these files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let certified =
            Reloading::new("the client certificate", vec![cert.to_owned(), key.to_owned()], files::certified_key)?;
        let verifier = Reloading::new("the server CA", vec![ca.to_owned()], server_verifier)?;
        let mut config = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls { what: "the client's protocol versions".into(), source })?
            .dangerous() // only to install the reloading wrapper around webpki's verifier
            .with_custom_certificate_verifier(Arc::new(ReloadingServerVerifier(verifier)))
            .with_client_cert_resolver(Arc::new(ReloadingClientCert(certified)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { config: Arc::new(config) })
    }
}

fn server_verifier(paths: &[std::path::PathBuf]) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let roots = files::roots(&paths[0])?;
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::provider()).build().map_err(|e| {
        TlsError::Invalid(format!("{}: cannot check the coordinator's certificate against it: {e}", paths[0].display()))
    })
}

#[derive(Debug)]
struct ReloadingClientCert(Reloading<CertifiedKey>);

impl ResolvesClientCert for ReloadingClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// webpki's verifier for the CA in force (reloaded when `ca.pem` changes).
#[derive(Debug)]
struct ReloadingServerVerifier(Reloading<Arc<WebPkiServerVerifier>>);

impl ServerCertVerifier for ReloadingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
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

/// How a client reaches the coordinator.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plaintext (`--insecure`), to a loopback address only.
    Insecure,
    /// Mutual TLS.
    Tls(ClientTls),
}

impl Transport {
    /// Checks `url` against the transport (see [`crate::check_url`]); `flag` names it.
    pub fn check_url(&self, url: &str, flag: &str) -> Result<(), TlsError> {
        crate::check_url(url, matches!(self, Transport::Tls(_)), flag)
    }

    /// Dials `endpoint` now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        match self {
            Transport::Insecure => endpoint.connect().await,
            Transport::Tls(tls) => endpoint.connect_with_connector(Connector(Arc::clone(&tls.config))).await,
        }
    }

    /// A channel that dials `endpoint` at its first request (and again after a failure).
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        match self {
            Transport::Insecure => endpoint.connect_lazy(),
            Transport::Tls(tls) => endpoint.connect_with_connector_lazy(Connector(Arc::clone(&tls.config))),
        }
    }
}

/// Dials TCP, then TLS with the server name taken from the URI's host.
#[derive(Clone)]
struct Connector(Arc<rustls::ClientConfig>);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = Arc::clone(&self.0);
        Box::pin(async move {
            let host = uri.host().ok_or("the coordinator's URL has no host")?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, Role};
    use crate::test_certs;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_stream::StreamExt as _;
    use tower_service::Service as _;

    async fn server(
        dir: &Path,
    ) -> (std::net::SocketAddr, tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::Conn>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, crate::server::incoming(listener, Some(crate::ServerTls::load(dir).expect("server tls"))))
    }

    fn uri(addr: std::net::SocketAddr) -> http::Uri {
        format!("https://{addr}").parse().expect("uri")
    }

    #[tokio::test]
    async fn the_server_learns_the_clients_identity_from_its_certificate() {
        let dir = test_certs::dir("identity");
        let id = Identity::Operator { name: "ana".into(), role: Role::Viewer };
        crate::issue::issue(&dir, &id).expect("issue");
        let (addr, mut incoming) = server(&dir).await;
        let client = ClientTls::load(&dir, "operator-ana").expect("client tls");
        let mut io = Connector(client.config).call(uri(addr)).await.expect("handshake").into_inner();
        io.write_all(b"x").await.expect("write");
        let conn = incoming.next().await.expect("a connection").expect("ok");
        let peer = tonic::transport::server::Connected::connect_info(&conn);
        assert!(peer.tls);
        assert_eq!(peer.identity, Some(id));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_client_of_another_ca_is_refused() {
        let dir = test_certs::dir("ca-a");
        let other = test_certs::dir("ca-b");
        crate::issue::issue(&other, &Identity::Node("a".into())).expect("issue");
        // The client trusts the server's CA, but its own certificate is from another CA.
        let client =
            ClientTls::from_files(&dir.join("ca.pem"), &other.join("node-a.pem"), &other.join("node-a-key.pem"))
                .expect("client tls");
        let (addr, mut incoming) = server(&dir).await;
        let refused = async {
            let mut io = Connector(client.config).call(uri(addr)).await?.into_inner();
            io.write_all(b"x").await?;
            let mut b = [0u8; 1];
            io.read_exact(&mut b).await?;
            Ok::<_, BoxError>(())
        };
        assert!(refused.await.is_err(), "the handshake must fail");
        let none = tokio::time::timeout(std::time::Duration::from_millis(200), incoming.next()).await;
        assert!(none.is_err(), "no connection reached the server");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other);
    }

    #[tokio::test]
    async fn a_reissued_server_certificate_is_used_without_a_restart() {
        let dir = test_certs::dir("rotate");
        crate::issue::issue(&dir, &Identity::Node("a".into())).expect("issue");
        let (addr, _incoming) = server(&dir).await;
        let client = ClientTls::load(&dir, "node-a").expect("client tls");
        let served = |config: Arc<rustls::ClientConfig>| async move {
            let io = Connector(config).call(uri(addr)).await.expect("handshake").into_inner();
            io.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
        };
        let before = served(Arc::clone(&client.config)).await;
        crate::issue::issue_coordinator(&dir, &[]).expect("reissue");
        std::thread::sleep(crate::CHECK_EVERY + std::time::Duration::from_millis(100));
        let after = served(Arc::clone(&client.config)).await;
        assert_ne!(before, after, "the new certificate is served");
        assert_eq!(after, crate::files::certs(&dir.join("coordinator.pem")).expect("certs")[0].to_vec());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
