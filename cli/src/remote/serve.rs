//! `hitless coordinator`: runs the coordinator server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use hitless_model::Duration;

use super::{runtime, RemoteError};

/// `hitless coordinator`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Directory of the coordinator's store (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Log format.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Longest wait for a new instance to become healthy before its step fails.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub health_timeout: Duration,
    /// Prometheus server whose HTTP API evaluates analysis gates (http://HOST:PORT);
    /// without it, gates read the counters agents send.
    #[arg(long, value_name = "URL")]
    pub prometheus_url: Option<hitless_coordinator::engine::prometheus::PromUrl>,
    /// How long after a gate's window Prometheus has scraped the window's last samples
    /// (about two scrape intervals).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub prometheus_lag: Duration,
    /// How long a stopped instance stays registered as `down` (so that clients whose
    /// registry cache still lists it are steered to a sibling) before it is removed.
    #[arg(long, value_name = "DURATION", default_value = "3m")]
    pub tombstone: Duration,
}

/// Runs the coordinator until SIGINT or SIGTERM: with mutual TLS from `tls_dir`
/// (`ca.pem`, `coordinator.pem`, `coordinator-key.pem`), or in plaintext on a loopback
/// address with `insecure`; one of the two.
pub fn serve(args: &ServeArgs, tls_dir: Option<&Path>, insecure: bool) -> Result<(), RemoteError> {
    let tls = match (tls_dir, insecure) {
        (Some(_), true) => {
            return Err(RemoteError::BadInput(
                "--insecure and --tls-dir: give one; --tls-dir DIR serves mutual TLS, --insecure plaintext on loopback"
                    .into(),
            ))
        }
        (None, false) => {
            return Err(RemoteError::BadInput(format!(
                "the coordinator serves mutual TLS: give --tls-dir DIR (create it with `hitless certs init --dir DIR --san HOST`), or --insecure for plaintext on a loopback --listen address (now {})",
                args.listen
            )))
        }
        (None, true) => {
            hitless_tls::require_loopback(args.listen, "--listen").map_err(|e| RemoteError::BadInput(e.to_string()))?;
            None
        }
        (Some(dir), false) => Some(
            hitless_tls::ServerTls::load(dir).map_err(|e| RemoteError::BadInput(format!("--tls-dir: {e}")))?,
        ),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
    runtime()?.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        let settings = hitless_coordinator::server::Settings {
            health_timeout: args.health_timeout.to_std(),
            prometheus: args.prometheus_url.clone(),
            prometheus_lag: args.prometheus_lag.to_std(),
            tombstone: args.tombstone.to_std(),
            per_identity: Default::default(),
        };
        hitless_coordinator::server::serve(args.listen, &args.data_dir, settings, tls, |addr| println!("listening on {addr}"), shutdown)
            .await
            .map_err(|e| RemoteError::Failed(e.into()))
    })
}
