//! Drain barriers timed over every simulated agent's session, through the
//! coordinator's `Coordinator` API as the CLI calls it.

use std::time::{Duration, Instant};

use anyhow::bail;
use hitless_proto::v1::{self as pb, coordinator_client::CoordinatorClient};

/// The drained instance.
const SERVICE: &str = "cart";
const ADDRESS: &str = "127.140.0.2:8080";

/// Waits until `n` agents are connected and hold the registry's revision.
pub(super) async fn wait_synced(url: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let mut c = CoordinatorClient::connect(url.to_owned()).await?.max_decoding_message_size(64 << 20);
    let t = Instant::now();
    loop {
        let s = c.status(pb::StatusRequest {}).await?.into_inner();
        let synced = s.nodes.iter().filter(|x| x.connected && x.applied_revision == s.revision).count();
        if synced >= n {
            return Ok(());
        }
        if t.elapsed() > within {
            bail!("only {synced} of {n} agents hold revision {} after {within:?}", s.revision);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `count` drain/undrain barriers; the last ack and the RPC time of each complete one
/// in ms, and how many were incomplete (stops after 3 of those).
pub(super) async fn barriers(url: &str, n: usize, count: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>, usize)> {
    let mut client = CoordinatorClient::connect(url.to_owned()).await?.max_decoding_message_size(64 << 20);
    let (mut acks, mut rpcs, mut incomplete) = (Vec::with_capacity(count), Vec::with_capacity(count), 0);
    for k in 0..count {
        let req = pb::DrainRequest {
            key: Some(pb::InstanceKey { service: SERVICE.into(), address: ADDRESS.into() }),
            timeout_ms: 10_000,
        };
        let t = Instant::now();
        let r = if k % 2 == 0 { client.drain(req).await? } else { client.undrain(req).await? }.into_inner();
        let rpc = t.elapsed().as_secs_f64() * 1e3;
        if !r.complete || r.nodes.iter().filter(|x| x.acked).count() != n {
            incomplete += 1;
            let acked = r.nodes.iter().filter(|x| x.acked).count();
            eprintln!("scale: barrier {k} at {n} agents incomplete: {acked} acked of {} nodes", r.nodes.len());
            if incomplete >= 3 {
                break;
            }
            continue;
        }
        rpcs.push(rpc);
        acks.push(r.nodes.iter().map(|x| x.latency_us).max().unwrap_or(0) as f64 / 1e3);
    }
    Ok((acks, rpcs, incomplete))
}
