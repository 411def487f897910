//! Benchmarks of the control plane's cost at scale (`scale`) and of one real agent's
//! cost at rest and under churn (`agent`), with what both share: a coordinator
//! process of our own (its pid is needed for `/proc`), process CPU and RSS from
//! `/proc`, and the open-files limit.

pub mod agent;
pub mod scale;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hitless_tests::{bin, spawn_line, Proc};

/// A `hitless coordinator` (target/release/hitless) on a loopback address with a
/// fresh data directory; killed, and its directory and log removed, on drop.
pub struct Coord {
    /// `http://ADDR`.
    pub url: String,
    proc: Proc,
    dir: PathBuf,
}

impl Coord {
    /// Starts it and waits for its "listening on" line.
    pub fn start(name: &str, listen: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hitless-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        let log = std::fs::File::create(dir.join("coordinator.log")).expect("coordinator log");
        let mut cmd = Command::new(bin("hitless"));
        cmd.args(["coordinator", "--insecure", "--listen", listen, "--data-dir"]).arg(dir.join("data")).stderr(log);
        let proc = spawn_line(cmd, "listening on");
        Self { url: format!("http://{listen}"), proc, dir }
    }

    /// Its process id.
    pub fn pid(&mut self) -> u32 {
        self.proc.child().id()
    }

    /// The last lines of its log (for a failure message).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        self.proc.kill();
        if std::env::var_os("HITLESS_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("coordinator log kept in {}", self.dir.display());
        }
    }
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time a process used so far (utime + stime of `/proc/PID/stat`).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the man page, utime 14 and stime 15.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// A process's CPU, as a share of one core in percent, and RSS, over a window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// CPU time over wall time, in percent of one core.
    pub cpu_pct: f64,
    /// `VmRSS` at the end of the window, in KiB.
    pub rss_kib: u64,
}

/// Watches `pid` for `window`, calling `during` about every 100 ms meanwhile (churn),
/// and returns its CPU share and final RSS.
pub fn usage(pid: u32, window: Duration, mut during: impl FnMut(Duration)) -> anyhow::Result<Usage> {
    let c0 = cpu_time(pid).context("reading /proc/PID/stat (did the process exit?)")?;
    let t0 = Instant::now();
    while t0.elapsed() < window {
        during(t0.elapsed());
        std::thread::sleep(Duration::from_millis(100).min(window.saturating_sub(t0.elapsed())));
    }
    let c1 = cpu_time(pid).context("reading /proc/PID/stat (did the process exit?)")?;
    let wall = t0.elapsed();
    let rss_kib = rss_kib(pid).context("reading /proc/PID/status")?;
    Ok(Usage { cpu_pct: 100.0 * (c1 - c0).as_secs_f64() / wall.as_secs_f64(), rss_kib })
}

/// Raises this process's open-files limit to at least `want` (root may raise the hard
/// limit too, up to `fs.nr_open`); children inherit it. Returns the soft limit now.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    let new = libc::rlimit { rlim_cur: want.min(nr_open), rlim_max: lim.rlim_max.max(want.min(nr_open)) };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        return new.rlim_cur;
    }
    // Not root: as far as the hard limit goes.
    let new = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        new.rlim_cur
    } else {
        lim.rlim_cur
    }
}

/// A comma-separated list of sizes (`100,1000,10000`).
pub fn sizes(args: &[String], name: &str, default: &[usize]) -> anyhow::Result<Vec<usize>> {
    let Some(i) = args.iter().position(|a| a == name) else { return Ok(default.to_vec()) };
    let Some(v) = args.get(i + 1) else { bail!("{name}: give a list such as 100,1000") };
    v.split(',')
        .map(|s| s.trim().replace('_', "").parse::<usize>().with_context(|| format!("{name}: {s:?} is not a count")))
        .filter(|r| !matches!(r, Ok(0)))
        .collect()
}

/// `12345` as `12,345`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A registry file of `services` × `per` backends, as compact as the format allows
/// (a registry applied through the coordinator must fit its 1 MiB `Apply` limit).
/// Backend `k` of the whole registry is [`backend_addr`]`(k)`: distinct loopback
/// addresses, never dialled. `state(k)` gives its state word.
pub fn registry_yaml(services: usize, per: usize, state: impl Fn(usize) -> &'static str) -> String {
    let mut s = String::with_capacity(services * per * 30 + 64);
    s.push_str("services:\n");
    for i in 0..services {
        let vip = format!("127.96.{}.{}:80", i / 250, i % 250 + 1);
        s.push_str(&format!("- {{name: s{i}, vips: [{vip}], backends: ["));
        for j in 0..per {
            let k = i * per + j;
            let st = state(k);
            if j > 0 {
                s.push(',');
            }
            if st == "serving" {
                s.push_str(&format!("{{address: {}}}", backend_addr(k)));
            } else {
                s.push_str(&format!("{{address: {}, state: {st}}}", backend_addr(k)));
            }
        }
        s.push_str("]}\n");
    }
    s
}

/// The address of backend `k` of [`registry_yaml`].
pub fn backend_addr(k: usize) -> String {
    // 250 × 250 addresses per /16 from 127.100.0.0 on; port 8.
    let (b, rest) = (100 + k / 62_500, k % 62_500);
    format!("127.{b}.{}.{}:8", rest / 250, rest % 250 + 1)
}

/// Largest registry file sent in one `Registry.Apply`; larger ones go through
/// `Registry.ApplyStream` in parts of this size (as `hitless registry apply` does).
const APPLY_PART: usize = 1 << 20;

/// Replaces the coordinator's registry with a registry file's text; returns the revision.
pub async fn apply(url: &str, yaml: &str) -> anyhow::Result<u64> {
    use hitless_proto::v1::{registry_client::RegistryClient, ApplyChunk, ApplyRequest};
    let mut c = RegistryClient::connect(url.to_owned()).await?;
    let r = if yaml.len() <= APPLY_PART {
        c.apply(ApplyRequest { registry_yaml: yaml.to_owned() }).await?
    } else {
        let parts: Vec<ApplyChunk> =
            yaml.as_bytes().chunks(APPLY_PART).map(|p| ApplyChunk { registry_yaml_part: p.to_vec() }).collect();
        c.apply_stream(tonic::codegen::tokio_stream::iter(parts)).await?
    };
    Ok(r.into_inner().revision)
}

/// One row of the summary with no goal to meet (a figure to read, not a verdict).
pub fn measured(bench: &str, measure: &str, value: f64, unit: &str) {
    let Some(path) = std::env::var_os("HITLESS_BENCH_SUMMARY") else { return };
    let line = format!("{bench}\t{measure}\t{value:.4}\t{unit}\tmeasured\n");
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
    if let Err(e) = file.and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes())) {
        eprintln!("cannot append to the summary: {e}");
    }
}
