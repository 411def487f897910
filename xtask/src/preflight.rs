//! What the machine must have before the kernel tests, the demo's datapath or the
//! kernel benchmarks can run at all: a new enough kernel, a cgroup v2 mount, root.
//! None of these can be installed, so each problem is named with what to do.

use std::path::PathBuf;

/// The oldest kernel the datapath loads on: `cgroup/connect4` refuses a connect with
/// `bpf_set_retval`, which Linux 5.18 introduced.
pub const MIN_KERNEL: (u32, u32) = (5, 18);

/// What the preflight found, printed when it passes.
pub struct Machine {
    pub kernel: String,
    pub cgroup2: PathBuf,
}

/// Checks the kernel and the cgroup v2 mount, and the user when `need_root`; returns
/// every problem found, each with what to do.
pub fn check(need_root: bool) -> Result<Machine, Vec<String>> {
    let mut problems = Vec::new();
    let kernel = kernel_release();
    match kernel.as_deref().map(parse_release) {
        Some(Some(v)) if v >= MIN_KERNEL => {}
        Some(Some(_)) => problems.push(format!(
            "kernel {} is too old: the datapath needs Linux {}.{} or newer (bpf_set_retval); boot a newer kernel",
            kernel.as_deref().unwrap_or_default(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        )),
        Some(None) => problems.push(format!(
            "cannot read a kernel version from {:?}; the datapath needs Linux {}.{} or newer",
            kernel.as_deref().unwrap_or_default(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        )),
        None => problems.push("cannot read the kernel release (/proc/sys/kernel/osrelease, uname -r)".to_owned()),
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let cgroup2 = cgroup2_mount(&mounts);
    if cgroup2.is_none() {
        problems.push(
            "no cgroup v2 hierarchy is mounted (no `cgroup2` line in /proc/mounts), and the datapath attaches to one: \
             mount it (`mount -t cgroup2 none DIR`) or boot with systemd.unified_cgroup_hierarchy=1"
                .to_owned(),
        );
    }
    if need_root && !is_root() {
        problems.push("not root: loading BPF programs and creating cgroups needs root".to_owned());
    }
    match cgroup2 {
        Some(cgroup2) if problems.is_empty() => Ok(Machine { kernel: kernel.unwrap_or_default(), cgroup2 }),
        _ => Err(problems),
    }
}

/// One message for a list of problems.
pub fn report(what: &str, problems: &[String]) -> String {
    format!("{what} cannot run on this machine:\n  - {}", problems.join("\n  - "))
}

/// True when running as uid 0 (from /proc/self/status: xtask has no libc).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().nth(1) == Some("0"))))
        .unwrap_or(false)
}

fn kernel_release() -> Option<String> {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        return Some(s.trim().to_owned());
    }
    let out = std::process::Command::new("uname").arg("-r").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `6.1.0-18-amd64` → (6, 1); `5.18` → (5, 18); `6.18.44-fc-v669` → (6, 18).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The first cgroup v2 mount point in a /proc/mounts text (octal escapes decoded).
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(dir)))
    })
}

/// /proc/mounts writes a space as `\040`, a tab as `\011`, and so on.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.18"), Some((5, 18)));
        assert_eq!(parse_release("5.8.0"), Some((5, 8)));
        assert!(parse_release("5.8.0") < Some(MIN_KERNEL));
        assert!(parse_release("5.18.0-rc1") >= Some(MIN_KERNEL));
        assert!(parse_release("6.0.0") >= Some(MIN_KERNEL));
        assert_eq!(parse_release("linux"), None);
    }

    #[test]
    fn cgroup2_from_mounts() {
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount("none /a\\040b cgroup2 rw 0 0\n"), Some(PathBuf::from("/a b")));
        assert_eq!(cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
    }
}
