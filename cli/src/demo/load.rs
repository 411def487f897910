//! The demo's load: one `hitless demo-client` process per node (inside the node's
//! cgroup), whose progress lines are folded into one running tally.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;

use super::client::Progress;
use super::host::{Cgroup, Proc};

/// Who dials what, on one node.
pub struct ClientSpec<'a> {
    /// Threads on the VIP (none in the conventional run: it has no VIP).
    pub vip: Option<(&'a str, u32)>,
    /// Threads that dial addresses from a cached registry read from this file.
    pub cache: Option<(&'a Path, u32)>,
    /// Cache refresh period.
    pub refresh: Duration,
    /// Pause between the requests of one thread.
    pub pause: Duration,
}

/// Running client processes and their latest progress.
pub struct Load {
    procs: Vec<(Proc, Option<ChildStdin>)>,
    readers: Vec<JoinHandle<()>>,
    latest: Arc<Mutex<Vec<Progress>>>,
}

impl Load {
    /// Starts one client process in each cgroup.
    pub fn start(hitless: &Path, cgroups: &[&Cgroup], spec: &ClientSpec<'_>) -> anyhow::Result<Self> {
        let latest = Arc::new(Mutex::new(vec![Progress::default(); cgroups.len()]));
        let mut load = Self { procs: Vec::new(), readers: Vec::new(), latest };
        for (i, cg) in cgroups.iter().enumerate() {
            let mut cmd = cg.command(hitless)?;
            cmd.arg("demo-client");
            if let Some((vip, n)) = spec.vip {
                cmd.args(["--vip", vip, "--vip-clients", &n.to_string()]);
            }
            if let Some((view, n)) = spec.cache {
                cmd.arg("--registry-view").arg(view).args(["--cache-clients", &n.to_string()]);
            }
            cmd.args(["--cache-refresh-ms", &spec.refresh.as_millis().to_string()])
                .args(["--pause-ms", &spec.pause.as_millis().to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let mut child = cmd.spawn().context("starting a demo client")?;
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().context("client stdout")?;
            let latest = Arc::clone(&load.latest);
            load.readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(p) = serde_json::from_str::<Progress>(&line) {
                        lock(&latest)[i] = p;
                    }
                }
            }));
            load.procs.push((Proc(child), stdin));
        }
        Ok(load)
    }

    /// All clients' counts so far.
    pub fn tally(&self) -> Progress {
        let mut total = Progress::default();
        for p in lock(&self.latest).iter() {
            total.merge(p);
        }
        total
    }

    /// Stops the clients (they finish their request in flight) and returns the final tally.
    pub fn finish(mut self) -> Progress {
        for (_, stdin) in &mut self.procs {
            drop(stdin.take());
        }
        for (p, _) in &mut self.procs {
            let _ = p.0.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.tally()
    }
}

fn lock(p: &Mutex<Vec<Progress>>) -> std::sync::MutexGuard<'_, Vec<Progress>> {
    // The readers only assign whole values: a poisoned lock still holds consistent data.
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
