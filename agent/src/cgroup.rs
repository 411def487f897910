//! Finding the cgroup v2 hierarchy (never assume where it is mounted), and starting a
//! process inside a cgroup.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes the process `cmd` spawns join the cgroup `dir` between fork and exec: it is in
/// the cgroup before its first instruction runs, and so is everything it forks. `spawn`
/// fails with the write's error when the process could not join.
pub fn join_on_exec(cmd: &mut Command, dir: &Path) -> io::Result<()> {
    let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cgroup path contains NUL"))?;
    // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on
    // memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            // Take errno before close() can overwrite it.
            let write_error = io::Error::last_os_error();
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(write_error)
            }
        });
    }
    Ok(())
}

/// The mount point of the cgroup v2 hierarchy, read from `/proc/mounts`.
pub fn v2_mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    parse_v2_mount(&mounts).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem in /proc/mounts; mount one (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup",
        )
    })
}

/// The first `cgroup2` mount point in a `/proc/mounts` text.
pub fn parse_v2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(dir)))
    })
}

/// `/proc/mounts` escapes spaces, tabs, newlines and backslashes as `\ooo` octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Bytes, not chars: a non-ASCII path stays what it was.
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `dir` is a cgroup v2 directory (it has `cgroup.procs`).
pub fn is_cgroup(dir: &Path) -> bool {
    dir.join("cgroup.procs").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_non_standard_v2_mount() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_v2_mount(m), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_v2_mount("cgroup2 /mnt/my\\040cg cgroup2 rw 0 0"), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(parse_v2_mount("proc /proc proc rw 0 0"), None);
        assert_eq!(parse_v2_mount("cgroup2 /mnt/gr\u{fc}n cgroup2 rw 0 0"), Some(PathBuf::from("/mnt/gr\u{fc}n")));
    }
}

/// Whether `child` (which may not exist yet) lies inside `parent` or is `parent`,
/// comparing real paths: symlinks and `..` resolved as far as the path exists.
pub fn contains(parent: &Path, child: &Path) -> io::Result<bool> {
    let parent = parent.canonicalize()?;
    let mut existing = child.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(up)) => {
                rest.push(name.to_owned());
                existing = up.to_path_buf();
            }
            _ => break,
        }
    }
    let mut real = existing.canonicalize()?;
    for name in rest.into_iter().rev() {
        real.push(name);
    }
    Ok(real.starts_with(&parent))
}

#[cfg(test)]
mod contains_tests {
    use super::contains;

    #[test]
    fn a_child_inside_its_parent_even_before_it_exists() {
        let tmp = std::env::temp_dir().join(format!("hitless-contains-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("attach/node")).expect("dirs");
        std::fs::create_dir_all(tmp.join("sibling")).expect("dirs");
        assert!(contains(&tmp.join("attach"), &tmp.join("attach/node/workload")).expect("paths"));
        assert!(contains(&tmp.join("attach"), &tmp.join("attach")).expect("paths"));
        assert!(!contains(&tmp.join("attach"), &tmp.join("sibling/workload")).expect("paths"));
        assert!(!contains(&tmp.join("attach"), &tmp.join("attach/../sibling")).expect("paths"));
        assert!(!contains(&tmp.join("attach"), &tmp.join("attached")).expect("paths"));
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
