//! The client end of the local API: what `hitless-agent register` and `hitless-agent
//! prestop` (a pod's hooks) call, and what they print.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hitless_proto::v1::{self as pb, node_client::NodeClient};
use tonic::transport::Channel;

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach the agent at {socket}: {source}; is an agent running with --local-api {socket} (coordinator mode), and may this user open the socket (mode 0660, --local-api-group)?")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The agent refused or failed.
    #[error("{}", .0.message())]
    Refused(tonic::Status),
    /// Nothing accepted a connection at the address within `register --wait`.
    #[error("--wait {}: nothing accepted a TCP connection at {address} within it ({last}); start the instance before registering it, or wait longer", human(*.wait))]
    NotListening {
        /// The instance's address.
        address: String,
        /// The wait.
        wait: Duration,
        /// The last connect's error.
        last: String,
    },
    /// The pre-stop wait ran out with connections open.
    #[error(
        "the deadline passed with connections still open (the instance is draining everywhere; SIGTERM may cut them)"
    )]
    Deadline,
}

impl ClientError {
    /// Whether the request itself was bad (exit status 2).
    pub fn bad_input(&self) -> bool {
        matches!(self, Self::Refused(s) if s.code() == tonic::Code::InvalidArgument)
    }
}

async fn connect(socket: &Path, timeout: Duration) -> Result<NodeClient<Channel>, ClientError> {
    let channel = tonic::transport::Endpoint::from_shared(super::socket_uri(socket))
        .map_err(|source| ClientError::Connect { socket: socket.to_owned(), source })?
        .timeout(timeout)
        .connect()
        .await
        .map_err(|source| ClientError::Connect { socket: socket.to_owned(), source })?;
    Ok(NodeClient::new(channel))
}

/// Registers an instance through the agent at `socket`; prints what was done.
pub async fn register(socket: &Path, req: pb::LocalRegisterRequest) -> Result<(), ClientError> {
    register_when_listening(socket, req, Duration::ZERO).await
}

/// Registers an instance through the agent at `socket`, once its address accepts a TCP
/// connection when `wait` is not zero; prints what was done.
pub async fn register_when_listening(
    socket: &Path,
    req: pb::LocalRegisterRequest,
    wait: Duration,
) -> Result<(), ClientError> {
    if !wait.is_zero() {
        wait_listening(&req.address, wait).await?;
    }
    let mut client = connect(socket, Duration::from_secs(30)).await?;
    let (service, address) = (req.service.clone(), req.address.clone());
    let r = client.register(req).await.map_err(ClientError::Refused)?.into_inner();
    println!(
        "registered {service} {address} (registry revision {}); the agent renews its lease ({}) every {} until its prestop",
        r.revision,
        human(Duration::from_millis(r.ttl_ms)),
        human(Duration::from_millis(r.heartbeat_every_ms)),
    );
    Ok(())
}

/// Waits until `address` accepts a TCP connection (closed at once), for at most `wait`.
/// An address that does not parse is left for the agent to name.
async fn wait_listening(address: &str, wait: Duration) -> Result<(), ClientError> {
    let Ok(addr) = address.parse::<std::net::SocketAddr>() else { return Ok(()) };
    let end = tokio::time::Instant::now() + wait;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let last =
            match tokio::time::timeout(left.min(Duration::from_secs(1)), tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connect timed out".to_owned(),
            };
        if tokio::time::Instant::now() >= end {
            return Err(ClientError::NotListening { address: address.to_owned(), wait, last });
        }
        tokio::time::sleep(Duration::from_millis(100).min(end.saturating_duration_since(tokio::time::Instant::now())))
            .await;
    }
}

/// Runs an instance's pre-stop through the agent at `socket`; prints how long it waited
/// and why it ended. The deadline passing is an error (exit 1), after the print.
pub async fn prestop(socket: &Path, address: &str, deadline: Duration) -> Result<(), ClientError> {
    // The agent answers by the deadline; leave room for the barrier's answer.
    let mut client = connect(socket, deadline + Duration::from_secs(30)).await?;
    let req = pb::PreStopRequest { address: address.to_owned(), deadline_ms: deadline.as_millis() as u64 };
    let r = client.pre_stop(req).await.map_err(ClientError::Refused)?.into_inner();
    println!("{}", describe(&r, address, deadline));
    match r.end() {
        pb::PreStopEnd::Deadline => Err(ClientError::Deadline),
        _ => Ok(()),
    }
}

/// What a pre-stop did, in one line.
fn describe(r: &pb::PreStopResponse, address: &str, deadline: Duration) -> String {
    let barrier = if r.barrier_complete {
        format!("draining on every node ({} acked", r.nodes_acked)
    } else {
        format!("draining, but not acked by every live node in time ({} acked", r.nodes_acked)
    };
    let lost =
        if r.nodes_lost.is_empty() { String::new() } else { format!(", not connected: {}", r.nodes_lost.join(", ")) };
    let others = if !r.quiet_checked {
        "; other nodes' handshakes in flight not waited for (the coordinator has no DrainQuiet)".to_owned()
    } else if r.handshakes_late.is_empty() {
        format!("; no node's handshake in flight to it after {}", human(Duration::from_millis(r.quiet_ms)))
    } else {
        format!("; handshakes still in flight at the deadline on {}", r.handshakes_late.join(", "))
    };
    let why = match r.end() {
        pb::PreStopEnd::Deadline => format!(
            "ended at the deadline ({}) with {} connections and {} handshakes still open",
            human(deadline),
            r.open_at_end,
            r.handshakes_at_end
        ),
        _ => "ended because its connections ended (0 open, no handshake in flight)".to_owned(),
    };
    format!(
        "prestop {} {address}: {barrier}{lost}) after {}{others}; waited {} in all; {why}",
        r.service,
        human(Duration::from_millis(r.barrier_ms)),
        human(Duration::from_millis(r.waited_ms)),
    )
}

fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_how_long_and_why() {
        let mut r = pb::PreStopResponse {
            service: "web".into(),
            barrier_complete: true,
            nodes_acked: 2,
            barrier_ms: 4,
            waited_ms: 1_234,
            end: pb::PreStopEnd::Connections as i32,
            quiet_checked: true,
            quiet_ms: 1_001,
            ..Default::default()
        };
        assert_eq!(
            describe(&r, "127.0.0.1:80", Duration::from_secs(30)),
            "prestop web 127.0.0.1:80: draining on every node (2 acked) after 4ms; no node's handshake in flight to it after 1.001s; waited 1.234s in all; ended because its connections ended (0 open, no handshake in flight)"
        );
        r.quiet_checked = false;
        let text = describe(&r, "127.0.0.1:80", Duration::from_secs(30));
        assert!(text.contains("other nodes' handshakes in flight not waited for"), "{text}");
        r.quiet_checked = true;
        r.handshakes_late = vec!["node-c: 2".into()];
        let text = describe(&r, "127.0.0.1:80", Duration::from_secs(30));
        assert!(text.contains("handshakes still in flight at the deadline on node-c: 2"), "{text}");
        r.end = pb::PreStopEnd::Deadline as i32;
        r.open_at_end = 3;
        r.nodes_lost = vec!["node-b".into()];
        let text = describe(&r, "127.0.0.1:80", Duration::from_secs(30));
        assert!(text.contains("not connected: node-b"), "{text}");
        assert!(
            text.ends_with("ended at the deadline (30.000s) with 3 connections and 0 handshakes still open"),
            "{text}"
        );
    }
}
