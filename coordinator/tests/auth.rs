//! Authorization over mutual TLS (issue 14.2, 14.3): a coordinator served in-process
//! with certificates from `hitless_tls::issue`, called by an agent's and by operators'
//! certificates. Each refusal here fails if its check is removed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hitless_coordinator::server::{serve, Settings};
use hitless_proto::v1::{
    self as pb, agent_link_client::AgentLinkClient, agent_message, coordinator_client::CoordinatorClient,
    coordinator_message, registry_client::RegistryClient,
};
use hitless_tls::client::Transport;
use hitless_tls::{ClientTls, Identity, Role, ServerTls};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// A coordinator with mutual TLS on a free loopback port, and its certificates; stopped
/// and removed on drop.
struct Served {
    addr: SocketAddr,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const NODES: [&str; 2] = ["node-a", "node-b"];

async fn served(name: &str) -> Served {
    served_with(name, Settings::default()).await
}

async fn served_with(name: &str, settings: Settings) -> Served {
    let dir = std::env::temp_dir().join(format!("hitless-auth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    hitless_tls::issue::init(&dir.join("tls"), &[]).expect("certs init");
    for n in NODES {
        hitless_tls::issue::issue(&dir.join("tls"), &Identity::Node(n.into())).expect("issue node");
    }
    for role in Role::ALL {
        let id = Identity::Operator { name: role.name().into(), role };
        hitless_tls::issue::issue(&dir.join("tls"), &id).expect("issue operator");
    }
    let tls = ServerTls::load(&dir.join("tls")).expect("server tls");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let data = dir.join("data");
    tokio::spawn(async move {
        let ready = move |a| {
            let _ = ready_tx.send(a);
        };
        let stop = async move {
            let _ = stop_rx.await;
        };
        serve("127.0.0.1:0".parse().expect("addr"), &data, settings, Some(tls), ready, stop).await.expect("serve");
    });
    let addr = ready_rx.await.expect("the coordinator started");
    Served { addr, dir, stop: Some(stop_tx) }
}

impl Served {
    /// A channel presenting `DIR/STEM.pem`.
    async fn channel(&self, stem: &str) -> Channel {
        channel_from(&self.dir.join("tls"), stem, self.addr).await
    }
}

async fn channel_from(dir: &Path, stem: &str, addr: SocketAddr) -> Channel {
    let t = Transport::Tls(ClientTls::load(dir, stem).expect("client tls"));
    t.connect(Endpoint::from_shared(format!("https://{addr}")).expect("url")).await.expect("connect")
}

/// Calls `path` with an empty message (every request type decodes from no bytes) and
/// returns the status code (Ok for success).
async fn call(ch: Channel, path: &'static str, streaming: bool) -> Code {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<pb::StatusRequest, pb::StatusRequest>::default();
    let path = http::uri::PathAndQuery::from_static(path);
    let r = if streaming {
        let one = tokio_stream::iter(vec![pb::StatusRequest {}]);
        grpc.streaming(tonic::Request::new(one), path, codec).await.map(|_| ())
    } else {
        grpc.unary(tonic::Request::new(pb::StatusRequest {}), path, codec).await.map(|_| ())
    };
    r.err().map_or(Code::Ok, |s| s.code())
}

/// Every RPC and who may call it: the issue's roles table, written out here apart from
/// the server's own (`auth::RULES`): (path, streaming, lowest role, a node may).
const TABLE: &[(&str, bool, Option<Role>, bool)] = &[
    ("/hitless.v1.Coordinator/Status", false, Some(Role::Viewer), true),
    ("/hitless.v1.Coordinator/Pull", false, Some(Role::Viewer), false),
    ("/hitless.v1.Registry/List", false, Some(Role::Viewer), true),
    ("/hitless.v1.Registry/Watch", true, Some(Role::Viewer), true),
    ("/hitless.v1.Coordinator/Push", false, Some(Role::Operator), false),
    ("/hitless.v1.Coordinator/Pause", false, Some(Role::Operator), false),
    ("/hitless.v1.Coordinator/Resume", false, Some(Role::Operator), false),
    ("/hitless.v1.Coordinator/Promote", false, Some(Role::Operator), false),
    ("/hitless.v1.Coordinator/Abort", false, Some(Role::Operator), false),
    ("/hitless.v1.Coordinator/Drain", false, Some(Role::Operator), true),
    ("/hitless.v1.Coordinator/Undrain", false, Some(Role::Operator), true),
    ("/hitless.v1.Coordinator/DrainQuiet", false, Some(Role::Operator), true),
    ("/hitless.v1.Registry/Apply", false, Some(Role::Admin), false),
    ("/hitless.v1.Registry/ApplyStream", true, Some(Role::Admin), false),
    ("/hitless.v1.Registry/Register", false, Some(Role::Admin), true),
    ("/hitless.v1.Registry/Deregister", false, Some(Role::Admin), true),
    ("/hitless.v1.Registry/Heartbeat", false, Some(Role::Admin), true),
    ("/hitless.v1.Coordinator/RemoveNode", false, Some(Role::Admin), false),
    ("/hitless.v1.AgentLink/Session", true, None, true),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_refused_to_every_identity_below_its_role() {
    let s = served("roles").await;
    let mut refusals = 0;
    for &(path, streaming, min, node_may) in TABLE {
        for (stem, role) in [
            ("operator-viewer", Some(Role::Viewer)),
            ("operator-operator", Some(Role::Operator)),
            ("operator-admin", Some(Role::Admin)),
            ("node-node-a", None),
        ] {
            let allowed = match role {
                Some(r) => min.is_some_and(|m| r >= m),
                None => node_may,
            };
            let code = call(s.channel(stem).await, path, streaming).await;
            if allowed {
                assert_ne!(code, Code::PermissionDenied, "{stem} may call {path}");
            } else {
                assert_eq!(code, Code::PermissionDenied, "{stem} may not call {path}");
                refusals += 1;
            }
        }
    }
    assert!(refusals >= 30, "{refusals} refusals");
    // Health stays open to every identity (probes).
    let code = call(s.channel("operator-viewer").await, "/grpc.health.v1.Health/Check", false).await;
    assert_ne!(code, Code::PermissionDenied);
}

/// An agent session: the hello sent, the coordinator's stream, and the sender for more.
struct Session {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: tonic::Streaming<pb::CoordinatorMessage>,
}

async fn session(ch: Channel, hello: pb::Hello) -> Result<Session, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await.expect("queue hello");
    let rx = AgentLinkClient::new(ch).session(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Session { tx, rx })
}

fn hello(node: &str, applied: u64) -> pb::Hello {
    pb::Hello { node: node.into(), applied_revision: applied, snapshot_parts: true, ..Default::default() }
}

async fn roster(s: &Served) -> Vec<pb::NodeStatus> {
    let mut c = CoordinatorClient::new(s.channel("operator-admin").await);
    c.status(pb::StatusRequest {}).await.expect("status").into_inner().nodes
}

/// The revision of the first snapshot (or its parts) the coordinator sends.
async fn first_revision(rx: &mut tonic::Streaming<pb::CoordinatorMessage>) -> u64 {
    loop {
        let m = rx.message().await.expect("stream").expect("a message");
        match m.msg {
            Some(coordinator_message::Msg::Snapshot(s)) => return s.revision,
            Some(coordinator_message::Msg::SnapshotPart(p)) if p.last => return p.part.map_or(0, |s| s.revision),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_say_hello_for_another_node() {
    let s = served("hello").await;
    let refused = session(s.channel("node-node-a").await, hello("node-b", 0)).await.err().expect("refused");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("node-b") && refused.message().contains("node node-a"), "{}", refused.message());
    assert!(roster(&s).await.iter().all(|n| n.node != "node-b"), "node-b never joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_revisions_count_only_once_acked_and_reports_about_another_nodes_instances_are_refused() {
    let s = served("claims").await;
    // node-b joins, and an admin places an instance on it.
    let mut b = session(s.channel("node-node-b").await, hello("node-b", 0)).await.expect("node-b");
    let _ = first_revision(&mut b.rx).await;
    let instance = pb::Instance {
        service: "web".into(),
        address: "127.0.0.9:80".into(),
        weight: 100,
        version: "v1".into(),
        node: "node-b".into(),
        ..Default::default()
    };
    RegistryClient::new(s.channel("operator-admin").await)
        .register(pb::RegisterRequest { instance: Some(instance) })
        .await
        .expect("register");

    // node-a claims a revision far ahead: not believed before it acks.
    let mut a = session(s.channel("node-node-a").await, hello("node-a", 999)).await.expect("node-a");
    let applied = |nodes: &[pb::NodeStatus]| nodes.iter().find(|n| n.node == "node-a").map(|n| n.applied_revision);
    assert_eq!(applied(&roster(&s).await), Some(0), "the hello's claim is not the node's applied revision");
    let sent = first_revision(&mut a.rx).await;
    // An ack of a revision never sent is ignored; then a report about node-b's instance
    // ends the session (PermissionDenied), after the ack was handled.
    let ack =
        |revision| pb::AgentMessage { msg: Some(agent_message::Msg::Ack(pb::Ack { revision, ..Default::default() })) };
    a.tx.send(ack(999)).await.expect("send");
    let crashed = pb::InstanceReport {
        service: "web".into(),
        address: "127.0.0.9:80".into(),
        phase: pb::InstancePhase::Crashed as i32,
        ..Default::default()
    };
    a.tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Instance(crashed)) }).await.expect("send");
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match a.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the session ended without a status"),
                Err(s) => break s,
            }
        }
    })
    .await
    .expect("the report about node-b's instance was not refused (the session went on)");
    assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
    assert!(end.message().contains("127.0.0.9:80"), "{}", end.message());
    let now = applied(&roster(&s).await).expect("node-a in the roster");
    assert!(now <= sent, "the unsent revision 999 was not taken: {now}");
    // Nothing changed: node-b's instance is still serving.
    let list = RegistryClient::new(s.channel("operator-viewer").await).list(pb::ListRequest {}).await.expect("list");
    let i = list.into_inner().instances.into_iter().find(|i| i.address == "127.0.0.9:80").expect("still registered");
    assert_eq!(i.state(), pb::InstanceState::Serving);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_ca_reaches_nothing() {
    let s = served("ca").await;
    let other = std::env::temp_dir().join(format!("hitless-auth-other-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&other);
    hitless_tls::issue::init(&other, &[]).expect("init");
    hitless_tls::issue::issue(&other, &Identity::Operator { name: "eve".into(), role: Role::Admin }).expect("issue");
    // Trusts the right CA but presents another CA's admin certificate.
    let t = Transport::Tls(
        ClientTls::from_files(
            &s.dir.join("tls/ca.pem"),
            &other.join("operator-eve.pem"),
            &other.join("operator-eve-key.pem"),
        )
        .expect("client tls"),
    );
    let endpoint = Endpoint::from_shared(format!("https://{}", s.addr)).expect("url").timeout(Duration::from_secs(10));
    let outcome = match t.connect(endpoint).await {
        Err(_) => Code::Unavailable,
        Ok(ch) => call(ch, "/hitless.v1.Coordinator/Status", false).await,
    };
    assert_ne!(outcome, Code::Ok, "another CA's certificate was answered");
    let _ = std::fs::remove_dir_all(&other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_calling_faster_than_its_rate_gets_resource_exhausted_and_others_do_not() {
    let per_identity = hitless_tls::limits::PerIdentity { rate: 0.001, burst: 5, concurrent: 32 };
    let s = served_with("rate", Settings { per_identity, ..Settings::default() }).await;
    let ch = s.channel("operator-viewer").await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(call(ch.clone(), "/hitless.v1.Coordinator/Status", false).await);
    }
    assert_eq!(codes[..5], [Code::Ok; 5], "the burst is served: {codes:?}");
    assert_eq!(codes[5..], [Code::ResourceExhausted; 3], "beyond it, refused: {codes:?}");
    // Another identity has its own allowance.
    assert_eq!(call(s.channel("operator-admin").await, "/hitless.v1.Coordinator/Status", false).await, Code::Ok);
}
