//! The `hitless` commands that run or talk to a coordinator, one module each:
//! `coordinator` ([`serve`]), `status`, `drain`/`undrain`, `push` and the rollout
//! controls ([`rollout`]), `registry ...` and `node ...`; and what they share: the
//! connection (mutual TLS, or `--insecure` plaintext to loopback) and the exit status.

mod drain;
mod node;
mod registry;
mod rollout;
mod serve;
mod status;

use std::path::Path;

use anyhow::Context as _;
use hitless_proto::v1::{coordinator_client::CoordinatorClient, registry_client::RegistryClient};
use hitless_tls::client::Transport;
use hitless_tls::limits::{MAX_REQUEST, MAX_RESPONSE, RPC_TIMEOUT};
use tonic::transport::Channel;

pub use drain::{drain, DrainArgs};
pub use node::{node, NodeCommand};
pub use registry::{registry, RegistryCommand};
pub use rollout::{control, pull, push, PushArgs, StrategyArgs};
pub use serve::{serve, ServeArgs};
pub use status::{status, StatusArgs};

/// Where a coordinator listens unless told otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// How a remote command ended, for the exit status.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The request was refused as bad input (exit 2).
    #[error("{0}")]
    BadInput(String),
    /// The operation failed or the coordinator is unreachable (exit 1).
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for RemoteError {
    fn from(e: anyhow::Error) -> Self {
        Self::Failed(e)
    }
}

fn status_error(s: tonic::Status) -> RemoteError {
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => RemoteError::BadInput(s.message().to_owned()),
        tonic::Code::Unavailable => {
            RemoteError::Failed(anyhow::anyhow!("the coordinator is unavailable: {}", s.message()))
        }
        _ => RemoteError::Failed(anyhow::anyhow!("{}: {}", s.code(), s.message())),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, RemoteError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(RemoteError::Failed)
}

/// The coordinator a command talks to, and how.
pub struct Target {
    /// Its URL (`https://` with TLS, `http://` with `--insecure`).
    pub url: String,
    /// Mutual TLS with this party's certificate, or plaintext.
    pub transport: Transport,
}

/// The connection flags every remote command shares.
pub struct ConnectFlags<'a> {
    /// `--coordinator URL`.
    pub url: Option<&'a str>,
    /// `--tls-dir DIR` (or HITLESS_TLS_DIR).
    pub tls_dir: Option<&'a Path>,
    /// `--identity STEM` (or HITLESS_IDENTITY).
    pub identity: Option<&'a str>,
    /// `--insecure`.
    pub insecure: bool,
}

impl Target {
    /// The target the flags name; bad input (exit 2) when they do not fit together.
    pub fn from_flags(f: &ConnectFlags<'_>) -> Result<Target, RemoteError> {
        let bad = |s: String| RemoteError::BadInput(s);
        let transport = match (f.tls_dir, f.insecure) {
            (Some(_), true) => return Err(bad("--insecure and --tls-dir: give one; --tls-dir DIR turns mutual TLS on, --insecure is plaintext to a coordinator on loopback".into())),
            (None, false) => return Err(bad(format!(
                "the coordinator speaks mutual TLS: give --tls-dir DIR --identity operator-NAME (or set {TLS_DIR_ENV} and {IDENTITY_ENV}), or --insecure for plaintext to a coordinator on this machine's loopback"
            ))),
            (None, true) => Transport::Insecure,
            (Some(dir), false) => {
                let Some(stem) = f.identity else {
                    return Err(bad(format!(
                        "--identity: missing; give the certificate to use, e.g. --identity operator-NAME for {}/operator-NAME.pem (or set {IDENTITY_ENV})",
                        dir.display()
                    )));
                };
                if stem.is_empty() || stem.contains('/') {
                    return Err(bad(format!("--identity {stem:?}: give a file stem in --tls-dir such as operator-NAME")));
                }
                Transport::Tls(hitless_tls::ClientTls::load(dir, stem).map_err(|e| bad(format!("--tls-dir/--identity: {e}")))?)
            }
        };
        let url = match (f.url, &transport) {
            (Some(u), _) => u.to_owned(),
            (None, Transport::Insecure) => DEFAULT_URL.to_owned(),
            (None, Transport::Tls(_)) => DEFAULT_TLS_URL.to_owned(),
        };
        transport.check_url(&url, "--coordinator").map_err(|e| bad(e.to_string()))?;
        Ok(Target { url, transport })
    }
}

/// Where a coordinator listens unless told otherwise, with TLS.
pub const DEFAULT_TLS_URL: &str = "https://127.0.0.1:7070";
/// The environment variable `--tls-dir` defaults to.
pub const TLS_DIR_ENV: &str = "HITLESS_TLS_DIR";
/// The environment variable `--identity` defaults to.
pub const IDENTITY_ENV: &str = "HITLESS_IDENTITY";

async fn channel(to: &Target) -> Result<Channel, RemoteError> {
    let url = &to.url;
    let endpoint = Channel::from_shared(url.clone())
        .map_err(|_| RemoteError::BadInput(format!("--coordinator {url:?}: give a URL such as {DEFAULT_TLS_URL}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        // Every call ends: the longest (a drain barrier of up to 10 minutes) included.
        .timeout(RPC_TIMEOUT);
    to.transport
        .connect(endpoint)
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}; is `hitless coordinator` running there (and does it trust this certificate)?"))
        .map_err(RemoteError::Failed)
}

/// A `Coordinator` client with the message limits of `hitless_tls::limits`.
async fn coordinator_client(to: &Target) -> Result<CoordinatorClient<Channel>, RemoteError> {
    Ok(CoordinatorClient::new(channel(to).await?)
        .max_decoding_message_size(MAX_RESPONSE)
        .max_encoding_message_size(MAX_REQUEST))
}

/// A `Registry` client with the message limits of `hitless_tls::limits`.
async fn registry_client(to: &Target) -> Result<RegistryClient<Channel>, RemoteError> {
    Ok(RegistryClient::new(channel(to).await?)
        .max_decoding_message_size(MAX_RESPONSE)
        .max_encoding_message_size(MAX_REQUEST))
}

/// Longest wait for the coordinator's connection (TCP and TLS).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
