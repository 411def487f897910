//! What the demo needs from the machine, and the guards that give it back: root, a
//! cgroup v2 hierarchy, the bpf() syscall, the sibling binaries; the demo's cgroup
//! tree; child processes in their own process group (so Ctrl-C reaches only the
//! demo, which then cleans up in order); and the interrupt flag every wait checks.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to [`interrupted`] instead of ending the process, so that
/// the demo's guards run.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

/// Whether Ctrl-C (or SIGTERM) arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps `d`, or returns an error as soon as the demo is interrupted.
pub fn pause(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Everything missing for the demo, one line each, or nothing.
pub fn preflight(binaries: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push(
            "root: the demo creates cgroups and loads eBPF programs into the kernel; run it as root (sudo hitless demo)"
                .to_owned(),
        );
        return missing;
    }
    if let Err(e) = hitless_agent::cgroup::v2_mount() {
        missing.push(format!("a cgroup v2 hierarchy: {e}"));
    }
    if let Err(e) = bpf_syscall() {
        missing.push(e);
    }
    for b in binaries {
        if let Err(e) = sibling(b) {
            missing.push(format!("{e:#}"));
        }
    }
    missing
}

/// Creates (and closes) a one-entry BPF array map: proves the kernel takes bpf() from us.
fn bpf_syscall() -> Result<(), String> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate { map_type: BPF_MAP_TYPE_ARRAY, key_size: 4, value_size: 4, max_entries: 1 };
    // SAFETY: BPF_MAP_CREATE reads `size` bytes of a valid attribute struct; the
    // kernel treats the fields after these as zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>() as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "BPF: the kernel refused bpf() ({e}); it needs CONFIG_BPF_SYSCALL and CAP_BPF (root outside a restricted container)"
        ));
    }
    // SAFETY: fd is the map we just created and own.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// A binary installed next to this one (cargo builds them side by side).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the hitless binary")?;
    let path = exe.parent().map(|d| d.join(name)).unwrap_or_default();
    if path.is_file() {
        Ok(path)
    } else {
        bail!("{name}: not found next to {}; build the workspace (cargo build --release)", exe.display())
    }
}

/// A cgroup the demo created; dropping it kills what runs inside (subtree included)
/// and removes it.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `dir` (parents included).
    pub fn create(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self { path: dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command whose process starts inside this cgroup, in its own process group.
    pub fn command(&self, program: &Path) -> std::io::Result<Command> {
        command_in(&self.path, program)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// A command whose process starts inside the cgroup `dir`, in its own process group.
pub fn command_in(dir: &Path, program: &Path) -> std::io::Result<Command> {
    let mut cmd = command(program);
    hitless_agent::cgroup::join_on_exec(&mut cmd, dir)?;
    Ok(cmd)
}

/// A command in its own process group: Ctrl-C in the terminal reaches only the demo.
pub fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.process_group(0);
    cmd
}

/// Processes in the cgroup `dir` and below (0 when it does not exist).
pub fn processes(dir: &Path) -> usize {
    let own = std::fs::read_to_string(dir.join("cgroup.procs")).map_or(0, |s| s.lines().count());
    let below: usize = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).map(|e| processes(&e.path())).sum())
        .unwrap_or(0);
    own + below
}

/// Kills every process in the cgroup tree at `dir` and removes it, deepest first.
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if remove_dirs(dir) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

fn remove_dirs(dir: &Path) -> bool {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                remove_dirs(&e.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// A child process that is stopped when dropped: SIGTERM, a moment, then SIGKILL.
pub struct Proc(pub Child);

impl Proc {
    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        if self.running() {
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let end = Instant::now() + grace;
            while self.running() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_millis(500));
    }
}
