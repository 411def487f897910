//! Processes and their cgroups: start a process inside a cgroup (in its own session, stdio
//! to a file), tell whether a cgroup still holds processes, signal or kill all of them,
//! and read the tail of a log.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Used when the instance's environment has no `PATH` of its own.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts `argv` with exactly `env` (plus a default `PATH`) inside `cgroup`, stdin from
/// `/dev/null`, stdout and stderr appended to `log`. With `session`, the process leads a
/// new session, so signals to the agent's terminal or process group never reach it.
/// The process is in the cgroup before its first instruction runs: `spawn` returns only
/// once `exec` succeeded, after the child wrote itself into `cgroup.procs`.
pub(crate) fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cgroup: &Path,
    log: &Path,
    session: bool,
) -> io::Result<Child> {
    crate::failpoint!("agent.driver.spawn", |fp| crate::writer::injected_io(fp));
    let (program, args) =
        argv.split_first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the command is empty"))?;
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().stdin(Stdio::null()).stdout(out).stderr(err);
    if !env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    crate::cgroup::join_on_exec(&mut cmd, cgroup)?;
    if session {
        // SAFETY: setsid is async-signal-safe; it runs after the cgroup join above.
        unsafe {
            cmd.pre_exec(|| if libc::setsid() < 0 { Err(io::Error::last_os_error()) } else { Ok(()) });
        }
    }
    cmd.spawn()
}

/// Whether `cgroup` still holds a process (`populated 1` in `cgroup.events`). A missing
/// cgroup holds nothing.
pub(crate) fn populated(cgroup: &Path) -> io::Result<bool> {
    match std::fs::read_to_string(cgroup.join("cgroup.events")) {
        Ok(text) => Ok(text.lines().any(|l| l.trim() == "populated 1")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The processes directly in `cgroup`.
pub(crate) fn procs(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Sends `signal` once to every process of `cgroup` (path `rel` from the cgroup v2
/// root) not in `done`, and adds them to it. Each process is pinned with a pidfd and
/// checked to still be in the cgroup before it is signalled, so a recycled pid never
/// gets a signal meant for an instance.
pub(crate) fn signal_all(cgroup: &Path, rel: &str, signal: i32, done: &mut BTreeSet<i32>) -> usize {
    let mut sent = 0;
    for pid in procs(cgroup) {
        if !done.insert(pid) {
            continue;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            continue; // gone already
        }
        // SAFETY: fd was just returned by pidfd_open and is owned here only.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if cgroup_of(pid as u32).as_deref() != Some(rel) {
            continue;
        }
        // SAFETY: pidfd_send_signal on a descriptor we own, no siginfo.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        if r == 0 {
            sent += 1;
        }
    }
    sent
}

/// Kills every process of `cgroup` (path `rel` from the cgroup v2 root): `cgroup.kill`
/// where the kernel has it (Linux 5.14), else SIGKILL to each process. Call it until the
/// cgroup is empty, so that the fallback also catches processes forked meanwhile.
pub(crate) fn kill_all(cgroup: &Path, rel: &str) -> io::Result<()> {
    match std::fs::write(cgroup.join("cgroup.kill"), "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if cgroup.exists() {
                signal_all(cgroup, rel, libc::SIGKILL, &mut BTreeSet::new());
            }
            Ok(())
        }
        other => other,
    }
}

/// Removes an empty cgroup; a missing one is fine. The kernel may report it busy for a
/// moment after its last process exited, so this retries for up to a second.
pub(crate) fn remove_cgroup(cgroup: &Path) -> io::Result<()> {
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The cgroup v2 path (from the hierarchy's root) of process `pid`, if it is alive.
pub(crate) fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// Whether `pid` is a live (not zombie) process in cgroup `rel`.
pub(crate) fn alive_in(pid: u32, rel: &str) -> bool {
    if pid == 0 || cgroup_of(pid).as_deref() != Some(rel) {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'.
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    matches!(state, Some(s) if s != "Z" && s != "X")
}

/// "exited with status 3" / "killed by signal 9".
pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => killed_by(s),
        _ => status.to_string(),
    }
}

/// How [`describe`] says a process died of signal `s`.
pub(crate) fn killed_by(s: i32) -> String {
    format!("killed by signal {s}")
}

/// The last `lines` lines of `log` (at most 4 KiB), for error messages.
pub(crate) fn log_tail(log: &Path, lines: usize) -> String {
    const MAX: u64 = 4096;
    let Ok(mut f) = File::open(log) else {
        return "(no output)".to_string();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(MAX))).is_err() || f.take(MAX).read_to_end(&mut buf).is_err() {
        return "(output unreadable)".to_string();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.trim().is_empty() {
        "(no output)".to_string()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("hitless-driver-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("x.log");
        std::fs::write(&log, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&log, 2), "c\nd");
        assert_eq!(log_tail(&dir.join("missing.log"), 2), "(no output)");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_process_is_alive_in_its_cgroup() {
        let me = std::process::id();
        let rel = cgroup_of(me).unwrap_or_default();
        if !rel.is_empty() {
            assert!(alive_in(me, &rel));
            assert!(!alive_in(me, "/not/this/one"));
        }
        assert!(!alive_in(0, &rel));
    }
}
