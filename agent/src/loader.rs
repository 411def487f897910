//! Loads the datapath, pins it under the node's pin directory and attaches it.
//!
//! Pin layout: `<pin-dir>/hl_*` are the maps, `<pin-dir>/links/<program>` the cgroup
//! links. Both outlive the agent: with the agent gone the kernel keeps steering with
//! the last state. A restarted agent reuses the maps as they are (nothing is lost) and
//! swaps each program behind its pinned link with `BPF_LINK_UPDATE`, so there is no
//! moment when a connect runs without a program.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, Program};
use aya::{Ebpf, EbpfLoader};

use crate::sys;
use crate::writer::names;

/// The compiled datapath objects, committed under `ebpf/` (rebuilt by `cargo xtask ebpf`).
static STEER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/steer.bpf.o"));
static SOCKOPS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/sockops.bpf.o"));

/// Map capacities, applied when the maps are first created.
#[derive(Debug, Clone, Copy)]
pub struct Capacities {
    /// Services (and counter slots).
    pub services: u32,
    /// VIPs.
    pub vips: u32,
    /// Backends (and their address and active-connection entries).
    pub backends: u32,
    /// Slot table entries, all services together.
    pub slots: u32,
    /// Sockets whose reverse translation is remembered (LRU).
    pub connections: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self { services: 16_384, vips: 16_384, backends: 65_536, slots: 131_072, connections: 131_072 }
    }
}

/// Why the datapath could not be loaded or detached.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A capability is missing (the agent checks them first, so rarely this), or BPF is
    /// not available.
    #[error("{what}: {source}; the agent needs CAP_BPF (maps and programs), CAP_NET_ADMIN (cgroup attach) and CAP_PERFMON (sock_ops pointer reads), or root, and a kernel with BPF cgroup hooks")]
    Permission {
        /// What was being done.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// A filesystem step failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// The pin directory is not on bpffs.
    #[error("pin directory {0} is not on a bpf filesystem; mount one there (mount -t bpf bpf DIR) or choose a --pin-dir under /sys/fs/bpf")]
    NotBpffs(PathBuf),
    /// The cgroup to attach to is not a cgroup v2 directory.
    #[error(
        "{0} is not a cgroup v2 directory (no cgroup.procs); pass --cgroup with a directory under the cgroup2 mount"
    )]
    NotCgroup(PathBuf),
    /// The node's datapath is attached to another cgroup than the one asked for.
    #[error(
        "the datapath pinned in {pin_dir} is attached to cgroup {attached} (link {link}), not to --cgroup {wanted}; nothing was changed. To move it, stop the agent, run `hitless-agent detach --node NAME` (connects go unsteered until the next start), then start the agent with the new --cgroup; or start it with --cgroup {attached}"
    )]
    OtherCgroup {
        /// The node's pin directory.
        pin_dir: PathBuf,
        /// The pinned link found attached elsewhere.
        link: PathBuf,
        /// Where it is attached (a path when found under the cgroup2 mount, else the id).
        attached: String,
        /// The --cgroup asked for.
        wanted: PathBuf,
    },
    /// Another process holds the node's lock.
    #[error("another agent is running for pin directory {0}; stop it first (only one agent may write a node's maps)")]
    Locked(PathBuf),
    /// aya refused the object or a program.
    #[error("loading the datapath: {0}")]
    Ebpf(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: String,
        /// Cause.
        source: aya::programs::ProgramError,
    },
    /// A link could not be turned into a pinnable one.
    #[error("link of program {name}: {source}")]
    Link {
        /// Program name.
        name: String,
        /// Cause.
        source: aya::programs::links::LinkError,
    },
    /// Pinning failed.
    #[error("pinning {path}: {source}")]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        source: aya::pin::PinError,
    },
}

/// What a load did.
#[derive(Debug)]
pub struct Loaded {
    /// The pin directory.
    pub pin_dir: PathBuf,
    /// Maps existed before and were reused.
    pub reused_maps: bool,
    /// Programs swapped in behind existing links.
    pub replaced: usize,
    /// Programs attached for the first time.
    pub attached: usize,
    /// Held for the agent's lifetime: the node's lock.
    pub lock: File,
}

/// The directory every node's default pin directory lives in.
pub const PIN_ROOT: &str = "/sys/fs/bpf/hitless";

/// Where the datapath of `node` is pinned unless told otherwise.
pub fn default_pin_dir(node: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(node)
}

/// Takes the node's lock: an exclusive `flock` on the pin directory.
pub fn lock(pin_dir: &Path) -> Result<File, LoadError> {
    let dir = File::open(pin_dir)
        .map_err(|source| LoadError::Io { what: format!("opening {}", pin_dir.display()), source })?;
    // SAFETY: flock on a descriptor we own.
    let ret = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret != 0 {
        return Err(LoadError::Locked(pin_dir.to_owned()));
    }
    Ok(dir)
}

/// Makes sure `pin_dir` exists on bpffs, mounting `/sys/fs/bpf` if it is the default
/// place and nothing is mounted there yet.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), LoadError> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !sys::is_bpffs(root) {
        sys::mount_bpffs(root)
            .map_err(|source| permission_or_io(format!("mounting bpffs at {}", root.display()), source))?;
    }
    std::fs::create_dir_all(pin_dir.join("links"))
        .map_err(|source| permission_or_io(format!("creating {}", pin_dir.display()), source))?;
    if !sys::is_bpffs(pin_dir) {
        return Err(LoadError::NotBpffs(pin_dir.to_owned()));
    }
    Ok(())
}

fn permission_or_io(what: String, source: io::Error) -> LoadError {
    if source.kind() == io::ErrorKind::PermissionDenied {
        LoadError::Permission { what, source }
    } else {
        LoadError::Io { what, source }
    }
}

/// Loads (or reloads) the datapath of one node and attaches it to `cgroup`.
pub fn load(pin_dir: &Path, cgroup: &Path, caps: Capacities) -> Result<Loaded, LoadError> {
    if !crate::cgroup::is_cgroup(cgroup) {
        return Err(LoadError::NotCgroup(cgroup.to_owned()));
    }
    prepare_pin_dir(pin_dir)?;
    let lock = lock(pin_dir)?;
    let reused_maps = pin_dir.join(names::FRONTENDS).exists();
    let cg =
        File::open(cgroup).map_err(|source| LoadError::Io { what: format!("opening {}", cgroup.display()), source })?;

    refuse_other_cgroup(pin_dir, cgroup)?;

    let mut replaced = 0;
    let mut attached = 0;
    // sockops first, and in the steering object the reverse translation before the
    // hooks that steer: on a first attach no steered socket then lacks its reverse.
    for obj in [SOCKOPS_OBJ, STEER_OBJ] {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(names::FRONTENDS, caps.vips)
            .map_max_entries(names::SERVICES, caps.services)
            .map_max_entries(names::COUNTERS, caps.services)
            .map_max_entries(names::SLOTS, caps.slots)
            .map_max_entries(names::BACKENDS, caps.backends)
            .map_max_entries(names::BACKEND_ADDR, caps.backends)
            .map_max_entries(names::ACTIVE, caps.backends)
            .map_max_entries(names::PENDING, caps.backends)
            .map_max_entries(names::BACKEND_STATS, caps.backends)
            .map_max_entries(names::FAILED_FLAG, caps.backends)
            .map_max_entries(names::FAILURES, crate::outlier::failure_ring_bytes(caps.backends))
            .map_max_entries(names::REV_NAT, caps.connections)
            .load(obj)
            .map_err(|e| match e {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.kind() == io::ErrorKind::PermissionDenied =>
                {
                    LoadError::Permission { what: "creating BPF maps".into(), source: io_error }
                }
                other => LoadError::Ebpf(other),
            })?;
        let (r, a) = attach_all(&mut ebpf, pin_dir, &cg)?;
        replaced += r;
        attached += a;
    }
    Ok(Loaded { pin_dir: pin_dir.to_owned(), reused_maps, replaced, attached, lock })
}

/// Refuses, before anything changes, when the node's pinned links are attached to
/// another cgroup than `cgroup`: swapping programs behind them would keep the datapath
/// where the operator no longer wants it, and never attach it where they do.
fn refuse_other_cgroup(pin_dir: &Path, cgroup: &Path) -> Result<(), LoadError> {
    use std::os::unix::fs::MetadataExt;
    let links = pin_dir.join("links");
    let Ok(entries) = std::fs::read_dir(&links) else { return Ok(()) };
    let wanted = std::fs::metadata(cgroup)
        .map_err(|source| LoadError::Io { what: format!("reading {}", cgroup.display()), source })?
        .ino();
    for link in entries.flatten().map(|e| e.path()) {
        let io = |what: &str| {
            let what = format!("{what} {}", link.display());
            move |source| LoadError::Io { what, source }
        };
        let fd = sys::obj_get(&link).map_err(io("opening pinned link"))?;
        match sys::link_cgroup_id(fd.as_fd()).map_err(io("reading the cgroup of"))? {
            Some(id) if id != wanted => {
                let attached = cgroup_path(id).map_or_else(|| format!("id {id}"), |p| p.display().to_string());
                return Err(LoadError::OtherCgroup {
                    pin_dir: pin_dir.to_owned(),
                    link,
                    attached,
                    wanted: cgroup.to_owned(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The directory of the cgroup with id `id` under the cgroup2 mount (searched up to
/// 20,000 directories deep-first; `None` when not found).
fn cgroup_path(id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut todo = vec![crate::cgroup::v2_mount().ok()?];
    let mut seen = 0;
    while let Some(dir) = todo.pop() {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        seen += 1;
        if seen > 20_000 {
            return None;
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            todo.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    None
}

/// Attach order inside the steering object: reverse translation first.
fn rank(name: &str) -> u8 {
    if name.contains("getpeer") || name.contains("recvmsg") {
        0
    } else {
        1
    }
}

fn attach_all(ebpf: &mut Ebpf, pin_dir: &Path, cg: &File) -> Result<(usize, usize), LoadError> {
    let mut names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    names.sort_by_key(|n| (rank(n), n.clone()));
    let (mut replaced, mut attached) = (0, 0);
    for name in names {
        let Some(prog) = ebpf.program_mut(&name) else { continue };
        let perr = |source| LoadError::Program { name: name.clone(), source };
        let link_path = pin_dir.join("links").join(&name);
        match prog {
            Program::CgroupSockAddr(p) => p.load().map_err(perr)?,
            Program::SockOps(p) => p.load().map_err(perr)?,
            _ => continue,
        }
        if link_path.exists() {
            let link = sys::obj_get(&link_path).map_err(|source| LoadError::Io {
                what: format!("opening pinned link {}", link_path.display()),
                source,
            })?;
            let fd = prog.fd().map_err(perr)?;
            sys::link_update(link.as_fd(), fd.as_fd()).map_err(|source| LoadError::Io {
                what: format!("swapping the program behind {}", link_path.display()),
                source,
            })?;
            replaced += 1;
            continue;
        }
        // Cgroup bpf links always stack with other programs (multi-attach
        // semantics) and the kernel rejects any attach flag on them: "Single" is
        // aya's name for flags 0, not exclusive attachment.
        let link: FdLink = match prog {
            Program::CgroupSockAddr(p) => {
                let id = p.attach(cg, CgroupAttachMode::Single).map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| LoadError::Link { name: name.clone(), source })?
            }
            Program::SockOps(p) => {
                let id = p.attach(cg, CgroupAttachMode::Single).map_err(perr)?;
                p.take_link(id)
                    .map_err(perr)?
                    .try_into()
                    .map_err(|source| LoadError::Link { name: name.clone(), source })?
            }
            _ => continue,
        };
        link.pin(&link_path).map_err(|source| LoadError::Pin { path: link_path.clone(), source })?;
        attached += 1;
    }
    Ok((replaced, attached))
}

/// Removes a node's datapath: links first (the programs detach), then the maps.
/// Refuses while an agent holds the node's lock.
pub fn detach(pin_dir: &Path) -> Result<bool, LoadError> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    let _lock = lock(pin_dir)?;
    let links = pin_dir.join("links");
    if links.exists() {
        for entry in std::fs::read_dir(&links)
            .map_err(|source| LoadError::Io { what: format!("reading {}", links.display()), source })?
        {
            let path = entry.map_err(|source| LoadError::Io { what: "reading links".into(), source })?.path();
            std::fs::remove_file(&path)
                .map_err(|source| LoadError::Io { what: format!("unpinning {}", path.display()), source })?;
        }
    }
    std::fs::remove_dir_all(pin_dir)
        .map_err(|source| LoadError::Io { what: format!("removing {}", pin_dir.display()), source })?;
    // Leave /sys/fs/bpf/hitless itself when other nodes still live there.
    if let Some(parent) = pin_dir.parent() {
        if parent.file_name().is_some_and(|n| n == "hitless") {
            let _ = std::fs::remove_dir(parent);
        }
    }
    Ok(true)
}
