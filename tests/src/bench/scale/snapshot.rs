//! Fresh sessions receiving a large registry: the time from a hello to the whole
//! snapshot, in parts and (as an older agent asks) in one message, with the bytes and
//! messages each took.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hitless_proto::v1::{self as pb, coordinator_message};

use super::sim::{dial, open};
use super::{wire, Opts, LISTEN};
use crate::bench::{thousands, Coord};

/// Fresh sessions receiving a large registry.
pub(super) struct Snap {
    pub(super) instances: usize,
    /// Size of the registry file and the time its apply took.
    yaml_bytes: usize,
    apply_ms: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// (ms, bytes, messages) of each session that assembled parts.
    parts: Vec<(f64, usize, usize)>,
    /// One session of an agent that does not assemble parts (as before this change).
    whole: Result<(f64, usize, usize), String>,
}

impl Snap {
    pub(super) fn median_ms(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.parts.iter().map(|p| p.0).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    pub(super) fn print(&self) {
        println!("\nsnapshot: a registry of {} instances (services x 10), fresh sessions", thousands(self.instances));
        println!(
            "registry file: {} bytes, applied in {:.0} ms (Registry.ApplyStream in 1 MiB parts)",
            thousands(self.yaml_bytes),
            self.apply_ms
        );
        println!(
            "coordinator RSS: {:.1} MiB before the registry, {:.1} MiB holding it",
            self.rss_before_kib as f64 / 1024.0,
            self.rss_after_kib as f64 / 1024.0
        );
        println!("| session | hello to whole snapshot | protobuf bytes | messages |");
        println!("|---|---:|---:|---:|");
        for (ms, bytes, msgs) in &self.parts {
            println!("| in parts | {ms:.1} ms | {} | {msgs} |", thousands(*bytes));
        }
        match &self.whole {
            Ok((ms, bytes, msgs)) => {
                println!("| one message (older agent) | {ms:.1} ms | {} | {msgs} |", thousands(*bytes))
            }
            Err(e) => println!("| one message (older agent) | failed: {e} | | |"),
        }
        println!("(every session uses the 4 MiB default decode limit of a tonic client)");
    }
}

/// Applies a registry of about `opts.instances` instances and times fresh sessions.
pub(super) fn snapshot(rt: &tokio::runtime::Runtime, opts: &Opts) -> anyhow::Result<Snap> {
    let mut coord = Coord::start("scale-snap", LISTEN);
    let pid = coord.pid();
    let url = coord.url.clone();
    let rss_before_kib = crate::bench::rss_kib(pid).unwrap_or(0);
    let instances = opts.instances / 10 * 10;
    let yaml = crate::bench::registry_yaml(instances / 10, 10, |_| "serving");
    let t = Instant::now();
    rt.block_on(crate::bench::apply(&url, &yaml)).context("applying the registry")?;
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    let yaml_bytes = yaml.len();
    drop(yaml);
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_kib = crate::bench::rss_kib(pid).unwrap_or(0);
    let mut parts = Vec::new();
    for k in 0..opts.snapshots {
        let r = rt.block_on(fresh(&url, &format!("snap-{k}"), true)).context("a session in parts")?;
        parts.push(r);
    }
    let whole = rt.block_on(fresh(&url, "snap-whole", false)).map_err(|e| format!("{e:#}"));
    drop(coord);
    Ok(Snap { instances, yaml_bytes, apply_ms, rss_before_kib, rss_after_kib, parts, whole })
}

/// A fresh session: the time from its hello to holding the whole snapshot, its bytes
/// and its messages. The connection is made before the clock starts.
async fn fresh(url: &str, node: &str, parts: bool) -> anyhow::Result<(f64, usize, usize)> {
    let channel = dial(url).await?;
    let t = Instant::now();
    let (_tx, mut inbound) = open(channel, node, parts).await?;
    let (mut bytes, mut msgs) = (0, 0);
    let mut held: Vec<pb::Instance> = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), inbound.message())
            .await
            .context("no snapshot within 60 s")??
            .context("the coordinator closed the session")?;
        msgs += 1;
        bytes += wire::message(&m);
        match m.msg {
            Some(coordinator_message::Msg::Snapshot(s)) => {
                held = s.instances;
                break;
            }
            Some(coordinator_message::Msg::SnapshotPart(p)) => {
                held.extend(p.part.unwrap_or_default().instances);
                if p.last {
                    break;
                }
            }
            _ => {}
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if held.is_empty() {
        bail!("the snapshot held no instance");
    }
    Ok((ms, bytes, msgs))
}
