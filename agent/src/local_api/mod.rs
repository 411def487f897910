//! The node-local agent API: a small gRPC service (`hitless.v1.Node`) on a unix socket,
//! for instances hitless does not run itself (a Kubernetes pod's). A pod's postStart or
//! start-up registers its instance through its node's agent, which renews the lease from
//! then on ([`leases`]), so the hook can exit; its preStop drains it through the
//! coordinator's barrier and waits for its connections ([`prestop`]). The agent must
//! follow a coordinator: the registry and the barrier are the coordinator's.
//!
//! The socket is created with mode 0660 (owner root, and `--local-api-group` when given),
//! so only what may drain the node's instances can reach it. The registered instances
//! are kept in the agent's state directory ([`registrations`]), so a restarted agent
//! renews their leases again.

pub mod client;
mod leases;
mod prestop;
pub mod registrations;

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hitless_proto::v1::{self as pb, node_server, registry_client::RegistryClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use leases::Leases;

/// Where the client subcommands look for the agent's socket unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/hitless/agent.sock";
/// A registration's lease when none is asked for.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// The shortest lease accepted (it is renewed every third of it).
pub const MIN_TTL: Duration = Duration::from_millis(300);
/// A pre-stop's longest wait when none is asked for.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// The socket's mode: owner and group read and write, nothing for others.
const MODE: u32 = 0o660;

/// Why the local API could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// The socket could not be created.
    #[error("--local-api {path}: {what}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// Another process answers on the socket.
    #[error("--local-api {0}: another process (an agent?) answers on this socket; stop it or choose another path")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("--local-api {0}: exists and is not a socket; remove it or choose another path")]
    NotSocket(PathBuf),
    /// The group does not exist.
    #[error("--local-api-group {0}: no such group (give a group name from /etc/group or a numeric gid)")]
    NoGroup(String),
    /// The socket's group could not be set: the agent is not in the group.
    #[error("--local-api-group {group}: cannot give {path} this group: {source}; without CAP_CHOWN the agent may give only a group it is in: add the gid to the agent's groups (Kubernetes: the pod's securityContext.supplementalGroups; systemd: SupplementaryGroups=)")]
    NotInGroup {
        /// The group as given.
        group: String,
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The registrations kept for restarts could not be read.
    #[error(transparent)]
    Registrations(#[from] registrations::RegistrationsError),
}

/// What the local API needs from the running agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// The socket path.
    pub socket: PathBuf,
    /// The group that may use the socket besides root.
    pub group: Option<String>,
    /// The coordinator's URL (the agent's `--coordinator`).
    pub coordinator: String,
    /// How the coordinator is reached (the agent's `--tls-dir` or `--insecure`).
    pub transport: hitless_tls::client::Transport,
    /// The node's pin directory (connection counts are read there).
    pub pin_dir: PathBuf,
    /// The node's name, for logs.
    pub node: String,
}

/// The socket, bound, and the leases restored from the state directory.
#[derive(Debug)]
pub struct Bound {
    listener: std::os::unix::net::UnixListener,
    leases: Leases,
}

/// Creates the socket (replacing a stale one), mode 0660 and the group set; the
/// registrations are kept in memory only (an agent restarted forgets them). Call before
/// the runtime starts: the result is handed to [`serve`].
pub fn bind(cfg: &Config) -> Result<Bound, LocalApiError> {
    bind_leases(cfg, Leases::default())
}

/// Like [`bind`], keeping the registrations in `state_dir` (the agent's `--state-dir`)
/// and holding again those an earlier agent kept there.
pub fn bind_with_state(cfg: &Config, state_dir: &Path) -> Result<Bound, LocalApiError> {
    bind_leases(cfg, Leases::restore(registrations::File::in_dir(state_dir)?)?)
}

fn bind_leases(cfg: &Config, leases: Leases) -> Result<Bound, LocalApiError> {
    let path = &cfg.socket;
    let err = |what| move |source| LocalApiError::Socket { path: path.clone(), what, source };
    let gid = cfg.group.as_deref().map(group_id).transpose()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err("creating its directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(LocalApiError::NotSocket(path.clone())),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(LocalApiError::InUse(path.clone())),
            // Left by an agent that is gone.
            Err(_) => std::fs::remove_file(path).map_err(err("removing the stale socket"))?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("reading it")(e)),
    }
    // Created with the mode already (no moment where others may connect), then chmod
    // for umasks that are stricter than this one.
    // SAFETY: umask only swaps the process's mask; nothing else runs yet.
    let old = unsafe { libc::umask(0o117) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(err("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(MODE)).map_err(err("setting its mode to 0660"))?;
    if let (Some(gid), Some(group)) = (gid, &cfg.group) {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| {
            // Do not leave a socket behind that nobody but root may use.
            let _ = std::fs::remove_file(path);
            if source.raw_os_error() == Some(libc::EPERM) {
                LocalApiError::NotInGroup { group: group.clone(), path: path.clone(), source }
            } else {
                err("setting its group")(source)
            }
        })?;
    }
    listener.set_nonblocking(true).map_err(err("making it non-blocking"))?;
    Ok(Bound { listener, leases })
}

/// A group name or a numeric gid.
fn group_id(group: &str) -> Result<u32, LocalApiError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group).map_err(|_| LocalApiError::NoGroup(group.to_owned()))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the result points into `grp`/`buf`.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return Err(LocalApiError::NoGroup(group.to_owned()));
    }
    Ok(grp.gr_gid)
}

/// Serves the API on `listener` until the agent exits, and renews the leases of the
/// instances registered through it.
pub async fn serve(bound: Bound, cfg: Config) -> Result<(), LocalApiError> {
    let listener = tokio::net::UnixListener::from_std(bound.listener).map_err(|source| LocalApiError::Socket {
        path: cfg.socket.clone(),
        what: "registering it with the runtime",
        source,
    })?;
    let endpoint = tonic::transport::Endpoint::from_shared(cfg.coordinator.clone())
        .map_err(|e| LocalApiError::Socket {
            path: cfg.socket.clone(),
            what: "the coordinator's URL",
            source: io::Error::other(e),
        })?
        .connect_timeout(Duration::from_secs(5));
    // With the agent's own identity (mutual TLS) or plaintext, as its link.
    let coordinator = cfg.transport.connect_lazy(endpoint);
    let leases = Arc::new(bound.leases);
    let restored = leases.held();
    if !restored.is_empty() {
        info!(node = %cfg.node, count = restored.len(), instances = ?restored, "renewing the leases of instances registered before this agent started");
    }
    tokio::spawn(leases::renew(Arc::clone(&leases), coordinator.clone()));
    let api = NodeApi { coordinator, leases, pin_dir: cfg.pin_dir.clone(), node: cfg.node.clone() };
    // Accepted connections, as the stream tonic serves.
    let (tx, rx) = mpsc::channel::<io::Result<tokio::net::UnixStream>>(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(s, _)| s);
            if let Err(e) = &accepted {
                warn!(error = %e, "local API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if tx.send(accepted).await.is_err() {
                return;
            }
        }
    });
    info!(node = %cfg.node, socket = %cfg.socket.display(), "local API listening");
    let served = tonic::transport::Server::builder()
        .add_service(node_server::NodeServer::new(api))
        .serve_with_incoming(ReceiverStream::new(rx))
        .await;
    if let Err(e) = served {
        warn!(error = %e, "local API stopped");
    }
    Ok(())
}

/// The `Node` service.
struct NodeApi {
    coordinator: Channel,
    leases: Arc<Leases>,
    pin_dir: PathBuf,
    node: String,
}

/// An instance address as the registry spells it (`127.0.0.1:80`, `[::1]:80`).
fn parse_address(address: &str, field: &str) -> Result<SocketAddr, Status> {
    address.parse::<SocketAddr>().map_err(|_| {
        Status::invalid_argument(format!("{field}: {address:?} is not an IP:PORT address (e.g. 10.1.2.3:8080)"))
    })
}

/// A status from the coordinator, saying it came from there.
fn from_coordinator(what: &str, s: &Status) -> Status {
    Status::new(s.code(), format!("{what}: the coordinator answered: {}", s.message()))
}

#[tonic::async_trait]
impl node_server::Node for NodeApi {
    async fn register(
        &self,
        req: Request<pb::LocalRegisterRequest>,
    ) -> Result<Response<pb::LocalRegisterResponse>, Status> {
        let r = req.into_inner();
        if r.service.is_empty() {
            return Err(Status::invalid_argument("service: missing; give the service's name (--service NAME)"));
        }
        let address = parse_address(&r.address, "address")?.to_string();
        let ttl = match r.ttl_ms {
            0 => DEFAULT_TTL,
            ms => Duration::from_millis(ms),
        };
        if ttl < MIN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl: {ttl:?} is shorter than {MIN_TTL:?}; give a longer lease (--ttl 10s)"
            )));
        }
        let instance = pb::Instance {
            service: r.service.clone(),
            address: address.clone(),
            state: pb::InstanceState::Serving as i32,
            weight: if r.weight == 0 { 100 } else { r.weight },
            version: r.version,
            // A registered instance: the coordinator's engine does not run it.
            node: String::new(),
            ttl_ms: ttl.as_millis() as u64,
        };
        let revision = RegistryClient::new(self.coordinator.clone())
            .register(pb::RegisterRequest { instance: Some(instance.clone()) })
            .await
            .map_err(|s| from_coordinator("registering", &s))?
            .into_inner()
            .revision;
        let every = self.leases.hold(instance).map_err(|e| {
            Status::internal(format!(
                "registered, and its lease is renewed, but not recorded for the agent's restarts: {e}"
            ))
        })?;
        info!(node = %self.node, service = %r.service, %address, ttl_ms = ttl.as_millis() as u64, revision, "registered; renewing its lease");
        Ok(Response::new(pb::LocalRegisterResponse {
            revision,
            ttl_ms: ttl.as_millis() as u64,
            heartbeat_every_ms: every.as_millis() as u64,
        }))
    }

    async fn pre_stop(&self, req: Request<pb::PreStopRequest>) -> Result<Response<pb::PreStopResponse>, Status> {
        prestop::run(self, req.into_inner()).await.map(Response::new)
    }
}

/// The path a client dials: `unix:` and an absolute path.
fn socket_uri(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    format!("unix://{}", abs.display())
}
