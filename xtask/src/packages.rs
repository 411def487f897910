//! The Debian packages the tests and benchmarks run, and one way to install the
//! missing ones: `cargo xtask deps`, `cargo xtask test` and `cargo xtask bench` all go
//! through [`ensure`].
//!
//! An install runs one `apt-get update`, then `apt-get install --no-install-recommends`
//! with `DEBIAN_FRONTEND=noninteractive`, under a `policy-rc.d` that forbids starting
//! services, so that prometheus, nginx and etcd are installed but not running (the
//! tests start their own, on loopback addresses of their own). A daemon the install
//! started all the same is stopped.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::preflight::is_root;

/// How to tell that a package is installed.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// A program on the PATH (or in an sbin directory a non-root PATH lacks).
    Bin(&'static str),
    /// A file.
    File(&'static str),
}

/// A service a package may start, by its init script or unit name and its program.
#[derive(Debug, Clone, Copy)]
pub struct Daemon {
    pub service: &'static str,
    pub program: &'static str,
}

/// A Debian package and what it brings that we use.
#[derive(Debug, Clone, Copy)]
pub struct Package {
    pub name: &'static str,
    pub probes: &'static [Probe],
    pub daemon: Option<Daemon>,
}

const fn pkg(name: &'static str, probes: &'static [Probe]) -> Package {
    Package { name, probes, daemon: None }
}

const fn daemon(name: &'static str, probes: &'static [Probe], service: &'static str, program: &'static str) -> Package {
    Package { name, probes, daemon: Some(Daemon { service, program }) }
}

pub const CLANG: Package = pkg("clang", &[Probe::Bin("clang")]);
pub const LIBBPF: Package = pkg("libbpf-dev", &[Probe::File("/usr/include/bpf/bpf_helpers.h")]);
pub const CURL: Package = pkg("curl", &[Probe::Bin("curl")]);
pub const PROMETHEUS: Package =
    daemon("prometheus", &[Probe::Bin("prometheus"), Probe::Bin("promtool")], "prometheus", "prometheus");
pub const IPTABLES: Package = pkg("iptables", &[Probe::Bin("iptables"), Probe::Bin("iptables-restore")]);
pub const NGINX: Package = daemon("nginx-light", &[Probe::Bin("nginx")], "nginx", "nginx");
pub const WRK: Package = pkg("wrk", &[Probe::Bin("wrk")]);
pub const ETCD: Package = daemon("etcd-server", &[Probe::Bin("etcd")], "etcd", "etcd");
pub const SETPRIV: Package = pkg("util-linux", &[Probe::Bin("setpriv")]);
pub const BUILDAH: Package = pkg("buildah", &[Probe::Bin("buildah")]);

/// Everything `cargo test --workspace` and CI use: clang and libbpf for `ebpf --check`,
/// curl, prometheus/promtool, iptables, nginx and wrk, etcd, setpriv.
pub const TESTS: &[Package] = &[CLANG, LIBBPF, CURL, PROMETHEUS, IPTABLES, NGINX, WRK, ETCD, SETPRIV];

/// `cargo xtask image`: buildah builds the container image (FROM scratch, no registry).
pub const IMAGE: &[Package] = &[BUILDAH];

/// The datapath benchmark's anchor: kube-proxy-style iptables DNAT chains.
pub const BENCH_DATAPATH: &[Package] = &[IPTABLES];

/// A package with the probes it failed.
#[derive(Debug)]
pub struct Missing {
    pub package: &'static Package,
    pub absent: Vec<String>,
}

/// The packages of `wanted` that are not (fully) installed.
pub fn missing(wanted: &'static [Package]) -> Vec<Missing> {
    let mut out: Vec<Missing> = Vec::new();
    for package in wanted {
        if out.iter().any(|m| m.package.name == package.name) {
            continue;
        }
        let absent: Vec<String> = package
            .probes
            .iter()
            .filter(|p| !present(**p))
            .map(|p| match p {
                Probe::Bin(b) | Probe::File(b) => (*b).to_owned(),
            })
            .collect();
        if !absent.is_empty() {
            out.push(Missing { package, absent });
        }
    }
    out
}

/// `wrk (Debian wrk), prometheus, promtool (Debian prometheus)`.
pub fn describe(missing: &[Missing]) -> String {
    missing
        .iter()
        .map(|m| format!("{} (Debian {})", m.absent.join(", "), m.package.name))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The names to give `apt-get install`.
pub fn names(missing: &[Missing]) -> Vec<&'static str> {
    missing.iter().map(|m| m.package.name).collect()
}

/// Installs whatever of `wanted` is missing (as root), for `why` ("the tests").
pub fn ensure(wanted: &'static [Package], why: &str) -> Result<(), String> {
    let need = missing(wanted);
    if need.is_empty() {
        return Ok(());
    }
    let names = names(&need);
    if !is_root() {
        return Err(format!(
            "{why} need {}, which are not installed, and installing them needs root: run `cargo xtask deps` as root \
             (e.g. `sudo env PATH=\"$PATH\" cargo xtask deps`), or `apt-get install --no-install-recommends {}`",
            describe(&need),
            names.join(" ")
        ));
    }
    if which("apt-get").is_none() {
        return Err(format!(
            "{why} need {}, and there is no apt-get here to install them: install them by hand",
            describe(&need)
        ));
    }
    println!("xtask: installing {} for {why} (missing: {})", names.join(" "), describe(&need));
    let running_before = daemon_pids(wanted);
    let guard = NoServiceStarts::install()?;
    let result = apt(&["update"]).and_then(|()| {
        let mut args = vec!["install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300"];
        args.extend(&names);
        apt(&args)
    });
    // Whatever happened, leave no daemon behind that the install started.
    stop_new_daemons(wanted, &running_before);
    drop(guard);
    result?;
    let still = missing(wanted);
    if still.is_empty() {
        println!("xtask: installed {}", names.join(" "));
        Ok(())
    } else {
        Err(format!("apt-get installed {}, but these are still missing: {}", names.join(" "), describe(&still)))
    }
}

/// Runs `apt-get -qq ARGS` without questions; its output is shown only if it fails.
fn apt(args: &[&str]) -> Result<(), String> {
    let out = Command::new("apt-get")
        .arg("-qq")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|e| format!("running apt-get: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "apt-get {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn present(p: Probe) -> bool {
    match p {
        Probe::Bin(b) => which(b).is_some(),
        Probe::File(f) => Path::new(f).is_file(),
    }
}

/// `b` on the PATH, or in the sbin directories that a non-root PATH often lacks.
pub fn which(b: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(b))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// A `policy-rc.d` that answers 101 ("action forbidden"), so that `invoke-rc.d` and
/// `deb-systemd-invoke` start no service during the install; removed when dropped
/// if this wrote it. One that was already there is left as it is.
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn install() -> Result<Self, String> {
        if Path::new(POLICY_RC_D).symlink_metadata().is_ok() {
            return Ok(Self { created: false });
        }
        let text =
            "#!/bin/sh\n# cargo xtask: start no service while it installs packages; removed afterwards\nexit 101\n";
        std::fs::write(POLICY_RC_D, text)
            .and_then(|()| std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| format!("writing {POLICY_RC_D}: {e}"))?;
        Ok(Self { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created {
            if let Err(e) = std::fs::remove_file(POLICY_RC_D) {
                eprintln!("xtask: removing {POLICY_RC_D}: {e}; remove it by hand");
            }
        }
    }
}

/// Pids of running processes whose program is one of `wanted`'s daemons, with the
/// daemon and the parent pid.
fn daemon_pids(wanted: &[Package]) -> Vec<(u32, Daemon, u32)> {
    let daemons: Vec<Daemon> = wanted.iter().filter_map(|p| p.daemon).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else { continue };
        let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let name = name.strip_suffix(" (deleted)").unwrap_or(name);
        if let Some(d) = daemons.iter().find(|d| d.program == name) {
            let ppid = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok()))
                .unwrap_or(0);
            out.push((pid, *d, ppid));
        }
    }
    out
}

/// Stops the daemons that started while the packages were installed: through
/// systemd when it runs, else the package's init script, and a process still left
/// (detached, so a child of init) gets SIGTERM. Processes that ran before, or that
/// another program started in the foreground, are left alone.
fn stop_new_daemons(wanted: &[Package], before: &[(u32, Daemon, u32)]) {
    let new = |all: Vec<(u32, Daemon, u32)>| -> Vec<(u32, Daemon, u32)> {
        all.into_iter().filter(|(pid, _, ppid)| *ppid == 1 && !before.iter().any(|b| b.0 == *pid)).collect()
    };
    let started = new(daemon_pids(wanted));
    if started.is_empty() {
        return;
    }
    let systemd = Path::new("/run/systemd/system").is_dir();
    let mut services: Vec<&str> = started.iter().map(|(_, d, _)| d.service).collect();
    services.sort_unstable();
    services.dedup();
    for service in services {
        eprintln!("xtask: the install started {service}; stopping it");
        let script = Path::new("/etc/init.d").join(service);
        let _ = if systemd {
            Command::new("systemctl").args(["stop", service]).status()
        } else if script.is_file() {
            Command::new(&script).arg("stop").status()
        } else {
            continue;
        };
    }
    for _ in 0..50 {
        let left = new(daemon_pids(wanted));
        if left.is_empty() {
            return;
        }
        for (pid, _, _) in &left {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).stderr(Stdio::null()).status();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for (pid, d, _) in new(daemon_pids(wanted)) {
        eprintln!("xtask: {} (pid {pid}) started during the install and is still running", d.program);
    }
}
