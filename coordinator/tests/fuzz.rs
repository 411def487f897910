//! A short fuzz run (issue 14.5, the CI part): every request an attacker or a typo
//! controls, from arbitrary and mutated bytes, reaches a live coordinator; the registry
//! and architecture parsers get arbitrary and mutated text. Nothing may panic or hang:
//! after every request the coordinator still answers. Seeded, so a failure repeats;
//! FUZZ_CASES (default 200 per input) runs longer.

use std::time::Duration;

use hitless_coordinator::server::{serve, Settings};
use hitless_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use prost::Message as _;
use tonic::transport::{Channel, Endpoint};

/// xorshift64*: a fixed sequence for a fixed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Random bytes, or `seed` with a few bytes changed, cut or repeated.
    fn bytes(&mut self, seed: &[u8]) -> Vec<u8> {
        if seed.is_empty() || self.below(3) == 0 {
            return (0..self.below(64)).map(|_| self.next() as u8).collect();
        }
        let mut b = seed.to_vec();
        for _ in 0..=self.below(4) {
            match self.below(4) {
                0 if !b.is_empty() => {
                    let i = self.below(b.len());
                    b[i] = self.next() as u8;
                }
                1 => b.truncate(self.below(b.len() + 1)),
                2 => {
                    let i = self.below(b.len() + 1);
                    b.insert(i, self.next() as u8);
                }
                _ => b.extend_from_within(..self.below(b.len() + 1)),
            }
        }
        b
    }
}

fn cases() -> usize {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

#[test]
fn the_registry_and_architecture_parsers_never_panic() {
    let seeds = [
        include_str!("../../cli/examples/shop.yaml"),
        include_str!("../../cli/examples/shop-current.yaml"),
        "services:\n  - name: cart\n    vips: [\"127.77.0.1:8080\"]\n    backends: [{ address: \"127.0.0.2:8080\", version: v1, weight: 100 }]\n",
    ];
    let mut rng = Rng(0x5eed_0001);
    for _ in 0..cases() * 5 {
        let seed = seeds[rng.below(seeds.len())];
        let text = String::from_utf8_lossy(&rng.bytes(seed.as_bytes())).into_owned();
        let _ = hitless_model::Architecture::parse(&text);
        let _ = hitless_model::registry::Registry::parse(&text);
    }
}

async fn coordinator() -> (Channel, tokio::sync::oneshot::Sender<()>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("hitless-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let data = dir.clone();
    tokio::spawn(async move {
        let ready = move |a| {
            let _ = ready_tx.send(a);
        };
        let stop = async move {
            let _ = stop_rx.await;
        };
        // Plaintext on loopback (--insecure): this is about what the handlers do with
        // what they decode; tests/auth.rs covers who may call them.
        serve("127.0.0.1:0".parse().expect("addr"), &data, Settings::default(), None, ready, stop)
            .await
            .expect("serve");
    });
    let addr: std::net::SocketAddr = ready_rx.await.expect("started");
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("connect");
    (ch, stop_tx, dir)
}

/// Sends `bytes` as the request of `path` (a raw codec: what the server decodes is
/// exactly these bytes) and returns whatever status came back.
async fn raw(ch: Channel, path: &'static str, bytes: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<RawBytes, pb::StatusRequest>::default();
    grpc.unary(tonic::Request::new(RawBytes(bytes)), http::uri::PathAndQuery::from_static(path), codec)
        .await
        .map(|_| ())
}

/// A message whose encoding is the bytes it holds.
#[derive(Clone, PartialEq, Default, Debug)]
struct RawBytes(Vec<u8>);

impl prost::Message for RawBytes {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        _tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, _tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_from_arbitrary_bytes_is_answered_and_the_coordinator_goes_on() {
    let (ch, stop, dir) = coordinator().await;
    let key = Some(pb::InstanceKey { service: "web".into(), address: "127.0.0.9:80".into() });
    let instance = pb::Instance {
        service: "web".into(),
        address: "127.0.0.9:80".into(),
        weight: 100,
        version: "v1".into(),
        ttl_ms: 5000,
        ..Default::default()
    };
    // (path, a valid request to mutate). Drains carry a short timeout in their seed.
    let inputs: Vec<(&'static str, Vec<u8>)> = vec![
        ("/hitless.v1.Registry/Register", pb::RegisterRequest { instance: Some(instance) }.encode_to_vec()),
        ("/hitless.v1.Registry/Deregister", pb::DeregisterRequest { key: key.clone() }.encode_to_vec()),
        (
            "/hitless.v1.Registry/Heartbeat",
            pb::HeartbeatRequest { keys: vec![key.clone().unwrap_or_default()] }.encode_to_vec(),
        ),
        (
            "/hitless.v1.Registry/Apply",
            pb::ApplyRequest { registry_yaml: "services:\n  - name: web\n    vips: [\"127.77.0.1:80\"]\n".into() }
                .encode_to_vec(),
        ),
        ("/hitless.v1.Coordinator/Drain", pb::DrainRequest { key: key.clone(), timeout_ms: 50 }.encode_to_vec()),
        ("/hitless.v1.Coordinator/Undrain", pb::DrainRequest { key, timeout_ms: 50 }.encode_to_vec()),
        (
            "/hitless.v1.Coordinator/Push",
            pb::PushRequest {
                architecture_yaml: include_str!("../../cli/examples/shop.yaml").into(),
                strategy: Some(pb::StrategySpec { name: "rolling".into(), ..Default::default() }),
            }
            .encode_to_vec(),
        ),
        (
            "/hitless.v1.Coordinator/RemoveNode",
            pb::RemoveNodeRequest { node: "node-a".into(), force: false }.encode_to_vec(),
        ),
        ("/hitless.v1.Coordinator/Abort", vec![]),
        ("/hitless.v1.Coordinator/Pull", vec![]),
    ];
    let mut rng = Rng(0x5eed_0002);
    let mut answered = 0;
    for _ in 0..cases() {
        for (path, seed) in &inputs {
            // No agent is connected: a drain's barrier has no one to wait for, whatever
            // timeout the bytes give it.
            let bytes = rng.bytes(seed);
            let r = tokio::time::timeout(Duration::from_secs(20), raw(ch.clone(), path, bytes.clone())).await;
            let r = r.unwrap_or_else(|_| panic!("{path} with {bytes:?} did not answer in 20 s"));
            if let Err(s) = &r {
                assert_ne!(s.code(), tonic::Code::Unknown, "{path} with {bytes:?}: {s:?}");
                // tonic answers bytes that do not decode with Internal; anything else
                // Internal (or a reset stream) would be a handler that failed.
                let undecodable = s.message().starts_with("failed to decode Protobuf message");
                assert!(s.code() != tonic::Code::Internal || undecodable, "{path} with {bytes:?}: {s:?}");
            }
            answered += 1;
        }
    }
    // Still serving.
    CoordinatorClient::new(ch).status(pb::StatusRequest {}).await.expect("status after the run");
    assert_eq!(answered, cases() * inputs.len());
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}
