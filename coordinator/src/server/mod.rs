//! The coordinator's gRPC server: `Registry`, `AgentLink` and `Coordinator`, plus the
//! standard health and reflection services so grpcurl and probes work.

mod agent_link;
pub mod auth;
pub(crate) mod control;
pub mod limits;
mod registry_api;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hitless_proto::v1::{
    agent_link_server::AgentLinkServer, coordinator_server::CoordinatorServer, registry_server::RegistryServer,
};
use hitless_tls::limits::MAX_RESPONSE;
use hitless_tls::ServerTls;
use tokio::net::TcpListener;
use tracing::info;

pub use control::DEFAULT_DRAIN_TIMEOUT;
pub use registry_api::{MAX_REGISTRY_TEXT, MAX_REGISTRY_YAML};
pub use state::{AckEvent, NodeInfo, Removed, Shared, TOMBSTONE_TTL};

use crate::store::{Store, StoreError};

/// Largest request message the server decodes (`hitless_tls::limits::MAX_REQUEST`).
pub const MAX_MESSAGE: usize = hitless_tls::limits::MAX_REQUEST;

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("building reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Plaintext was asked for on an address that is not loopback.
    #[error(transparent)]
    Insecure(#[from] hitless_tls::TlsError),
}

/// How the coordinator behaves (from its command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Longest wait for a new instance to become healthy before its step fails.
    pub health_timeout: Duration,
    /// The Prometheus server analysis gates query; `None`: the agents' own summaries.
    pub prometheus: Option<crate::engine::prometheus::PromUrl>,
    /// How long after a gate's window Prometheus has scraped its last samples (about
    /// two scrape intervals).
    pub prometheus_lag: Duration,
    /// How long a stopped instance stays in the registry as `down` (a tombstone), so
    /// that clients whose registry cache still lists it are steered, before it is removed.
    pub tombstone: Duration,
    /// What one certificate's identity may ask: calls per second and at once.
    pub per_identity: hitless_tls::limits::PerIdentity,
}

impl Default for Settings {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            health_timeout: crate::engine::run::HEALTH_TIMEOUT,
            prometheus: None,
            prometheus_lag: Duration::from_secs(30),
            tombstone: TOMBSTONE_TTL,
            per_identity: hitless_tls::limits::PerIdentity::default(),
        }
    }
}

/// Opens the store in `data_dir`, binds `listen`, calls `ready` with the bound address,
/// and serves until `shutdown` resolves: with mutual TLS when `tls` is given, else in
/// plaintext, which only a loopback `listen` address may (`--insecure`).
pub async fn serve(
    listen: SocketAddr,
    data_dir: &Path,
    settings: Settings,
    tls: Option<ServerTls>,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    if tls.is_none() {
        hitless_tls::require_loopback(listen, "--listen")?;
    }
    let store = Store::open(data_dir)?;
    let state = store.load()?;
    info!(revision = state.revision(), data_dir = %data_dir.display(), prometheus = ?settings.prometheus.as_ref().map(ToString::to_string), "registry loaded");
    let limiter = limits::Limiter::new(settings.per_identity);
    let shared = Shared::new(state, store, settings);

    let expiry = shared.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            expiry.expire_leases();
        }
    });

    tokio::spawn(crate::engine::run::run(shared.clone()));

    let listener = TcpListener::bind(listen).await.map_err(|source| ServeError::Bind { addr: listen, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind { addr: listen, source })?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RegistryServer<registry_api::RegistryApi>>().await;
    health.set_serving::<AgentLinkServer<agent_link::AgentLinkApi>>().await;
    health.set_serving::<CoordinatorServer<control::ControlApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hitless_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1 and the older v1alpha: grpcurl and other tools still ask for either.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    info!(%bound, tls = tls.is_some(), "coordinator listening");
    ready(bound);
    // Agent sessions never end by themselves, so a graceful shutdown would wait
    // forever: stop accepting, give requests in flight a moment, then return. Every
    // change was already committed to the store, so nothing is lost.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stopped = stop_rx.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let grace = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let server = tonic::transport::Server::builder()
        // Who may call what, before any handler (auth::RULES; plaintext is unchecked).
        .layer(auth::AuthorizeLayer { limiter })
        // Every call ends (the longest drain barrier included), and one connection has
        // a bounded number of calls open.
        .timeout(hitless_tls::limits::RPC_TIMEOUT)
        .max_concurrent_streams(Some(hitless_tls::limits::STREAMS_PER_CONNECTION))
        // Notice an agent that vanished without closing its connection.
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(3)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            RegistryServer::new(registry_api::RegistryApi { shared: shared.clone() })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_RESPONSE),
        )
        .add_service(
            AgentLinkServer::new(agent_link::AgentLinkApi { shared: shared.clone() })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_RESPONSE),
        )
        .add_service(
            CoordinatorServer::new(control::ControlApi { shared: Arc::clone(&shared) })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_RESPONSE),
        )
        // TLS handshakes (and TCP_NODELAY: replies are small and latency-bound) in
        // hitless_tls's accept loop; each request carries the peer's identity.
        .serve_with_incoming_shutdown(hitless_tls::server::incoming(listener, tls), shutdown);
    tokio::select! {
        r = server => r?,
        () = grace => info!("shutdown: closed the remaining agent sessions"),
    }
    drop(stop_rx);
    Ok(())
}

/// How long requests in flight get after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
