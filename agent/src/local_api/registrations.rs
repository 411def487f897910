//! The instances registered through the local API, kept in a small file in the agent's
//! state directory so that a restarted agent (killed, upgraded, its DaemonSet rolled)
//! renews their leases again: kept only in memory, they lapsed with the agent, and a
//! pod registered before it would have gone down while serving, then out of the
//! registry, and its prestop would have found nothing to drain.
//!
//! One line per instance under a version line, tab-separated fields (service, address,
//! version, weight, lease in ms) with `\`, tab and newline escaped. Written whole to a
//! temporary file, synced and renamed over the old one, so a crash leaves either the old
//! list or the new one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use hitless_proto::v1 as pb;

const HEADER: &str = "hitless-local-registrations 1";
/// The file's name in the state directory.
pub const FILE_NAME: &str = "local-registrations";

/// Why the file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationsError {
    /// Reading or writing failed.
    #[error("{path}: {what}: {source}; the agent's --state-dir must be a writable directory")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not one this agent wrote.
    #[error("{path}: line {line}: {why}; remove the file (the pods' next register adds them again) or fix the line")]
    Format {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// The registrations file at `path`.
#[derive(Debug, Clone)]
pub struct File {
    path: PathBuf,
}

impl File {
    /// The file in `state_dir` (created if missing, with the directory).
    pub fn in_dir(state_dir: &Path) -> Result<Self, RegistrationsError> {
        std::fs::create_dir_all(state_dir).map_err(|source| RegistrationsError::Io {
            path: state_dir.to_owned(),
            what: "creating the state directory",
            source,
        })?;
        Ok(Self { path: state_dir.join(FILE_NAME) })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The instances the file holds; none when it does not exist.
    pub fn load(&self) -> Result<Vec<pb::Instance>, RegistrationsError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(RegistrationsError::Io { path: self.path.clone(), what: "reading", source }),
        };
        decode(&text).map_err(|(line, why)| RegistrationsError::Format { path: self.path.clone(), line, why })
    }

    /// Replaces the file's content with `instances`.
    pub fn save<'a>(&self, instances: impl IntoIterator<Item = &'a pb::Instance>) -> Result<(), RegistrationsError> {
        let io = |what| move |source| RegistrationsError::Io { path: self.path.clone(), what, source };
        let tmp = self.path.with_file_name(format!(".{FILE_NAME}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io("creating its temporary file"))?;
        f.write_all(encode(instances).as_bytes()).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
        std::fs::rename(&tmp, &self.path).map_err(io("renaming the temporary file over it"))?;
        if let Some(dir) = self.path.parent() {
            // The rename itself must survive a crash of the machine too.
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing its directory"))?;
        }
        Ok(())
    }
}

fn encode<'a>(instances: impl IntoIterator<Item = &'a pb::Instance>) -> String {
    let mut out = format!("{HEADER}\n");
    for i in instances {
        let fields =
            [escape(&i.service), escape(&i.address), escape(&i.version), i.weight.to_string(), i.ttl_ms.to_string()];
        out.push_str(&fields.join("\t"));
        out.push('\n');
    }
    out
}

fn decode(text: &str) -> Result<Vec<pb::Instance>, (usize, String)> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, HEADER)) => {}
        other => return Err((1, format!("expected {HEADER:?}, found {:?}", other.map_or("", |(_, l)| l)))),
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        let line_no = n + 1;
        let fields: Vec<&str> = line.split('\t').collect();
        let [service, address, version, weight, ttl] = fields[..] else {
            return Err((
                line_no,
                format!("{} fields, expected 5 (service, address, version, weight, ttl_ms)", fields.len()),
            ));
        };
        let number =
            |v: &str, what: &str| v.parse::<u64>().map_err(|_| (line_no, format!("{what}: {v:?} is not a number")));
        out.push(pb::Instance {
            service: unescape(service),
            address: unescape(address),
            state: pb::InstanceState::Serving as i32,
            weight: u32::try_from(number(weight, "weight")?)
                .map_err(|_| (line_no, format!("weight: {weight} is too large")))?,
            version: unescape(version),
            node: String::new(),
            ttl_ms: number(ttl, "ttl_ms")?,
        });
    }
    Ok(out)
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, address: &str, version: &str) -> pb::Instance {
        pb::Instance {
            service: service.into(),
            address: address.into(),
            state: pb::InstanceState::Serving as i32,
            weight: 7,
            version: version.into(),
            node: String::new(),
            ttl_ms: 2_000,
        }
    }

    #[test]
    fn round_trips_and_survives_odd_versions() {
        let dir = std::env::temp_dir().join(format!("hitless-registrations-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = File::in_dir(&dir).expect("dir");
        assert!(file.load().expect("no file yet").is_empty());
        let list = vec![instance("web", "10.1.2.3:8080", "v1\twith\\odd\nbits"), instance("cart", "[::1]:80", "")];
        file.save(&list).expect("save");
        assert_eq!(file.load().expect("load"), list);
        file.save(&[]).expect("save none");
        assert!(file.load().expect("load").is_empty());
        std::fs::write(file.path(), "something else\n").expect("write");
        let err = file.load().expect_err("not ours").to_string();
        assert!(err.contains("line 1") && err.contains("remove the file"), "{err}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
