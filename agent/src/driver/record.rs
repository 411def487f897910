//! Instance records: one small text file per instance in the state directory, so that a
//! restarted agent knows what the previous one started. The format is `key=value` lines
//! under a version line; values (and the user-given part of keys) escape `\`, newlines
//! and `=`, so any argv, environment or config survives the round trip.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hitless_model::{Health, PreStop, RunSpec};

use super::InstanceSpec;

const HEADER: &str = "hitless-instance 1";
/// File name suffix of records in the state directory.
pub(crate) const SUFFIX: &str = ".instance";

/// Whether a recorded instance had passed its health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Starting,
    Serving,
}

/// What the driver keeps about one instance across agent restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub id: String,
    pub address: Ipv4Addr,
    pub pid: u32,
    pub phase: Phase,
    pub spec: InstanceSpec,
}

impl Record {
    /// The record's path in `state_dir`.
    pub fn path(state_dir: &Path, id: &str) -> PathBuf {
        state_dir.join(format!("{id}{SUFFIX}"))
    }

    /// Writes the record atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(state_dir, &self.id);
        let tmp = state_dir.join(format!(".{}{SUFFIX}.tmp", self.id));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(self.encode().as_bytes())?;
        crate::failpoint!("agent.driver.record.before_fsync", |fp| crate::writer::injected_io(fp));
        f.sync_all()?;
        crate::failpoint!("agent.driver.record.before_rename", |fp| crate::writer::injected_io(fp));
        std::fs::rename(&tmp, &path)?;
        // The rename itself must survive a crash of the machine too.
        std::fs::File::open(state_dir)?.sync_all()
    }

    /// The text of the record.
    pub fn encode(&self) -> String {
        let s = &self.spec;
        let mut out = format!("{HEADER}\n");
        let mut kv = |k: &str, v: &str| {
            let _ = writeln!(out, "{k}={}", escape(v));
        };
        kv("id", &self.id);
        kv("address", &self.address.to_string());
        kv("pid", &self.pid.to_string());
        kv("phase", if self.phase == Phase::Serving { "serving" } else { "starting" });
        kv("service", &s.service);
        kv("version", &s.version);
        kv("port", &s.port.to_string());
        kv("drain_deadline_ms", &s.drain_deadline.as_millis().to_string());
        kv("grace_ms", &s.grace.as_millis().to_string());
        for (i, a) in s.run.command.iter().enumerate() {
            kv(&format!("run.command.{i}"), a);
        }
        for (k, v) in &s.run.env {
            kv(&format!("run.env.{}", escape(k)), v);
        }
        match &s.health {
            None => {}
            Some(Health::Http(p)) => kv("health.http", p),
            Some(Health::Tcp(_)) => kv("health.tcp", "true"),
            Some(Health::Exec(argv)) => {
                kv("health.exec", &argv.len().to_string());
                for (i, a) in argv.iter().enumerate() {
                    kv(&format!("health.exec.{i}"), a);
                }
            }
        }
        match &s.prestop {
            None => {}
            Some(PreStop::Http(p)) => kv("prestop.http", p),
            Some(PreStop::Exec(argv)) => {
                kv("prestop.exec", &argv.len().to_string());
                for (i, a) in argv.iter().enumerate() {
                    kv(&format!("prestop.exec.{i}"), a);
                }
            }
        }
        for (k, v) in &s.config {
            kv(&format!("config.{}", escape(k)), v);
        }
        out
    }

    /// Parses a record's text.
    pub fn decode(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(format!("the first line is not {HEADER:?}"));
        }
        let mut fields = BTreeMap::new();
        for (n, line) in lines.enumerate() {
            let (k, v) = line.split_once('=').ok_or_else(|| format!("line {}: no `=`", n + 2))?;
            fields.insert(k.to_string(), unescape(v));
        }
        let get = |k: &str| fields.get(k).cloned().ok_or_else(|| format!("no `{k}`"));
        let num = |k: &str| -> Result<u64, String> { get(k)?.parse().map_err(|_| format!("`{k}` is not a number")) };
        let list = |prefix: &str| -> Vec<String> {
            (0..).map_while(|i| fields.get(&format!("{prefix}.{i}")).cloned()).collect()
        };
        let map = |prefix: &str| -> BTreeMap<String, String> {
            let p = format!("{prefix}.");
            fields.iter().filter_map(|(k, v)| k.strip_prefix(&p).map(|k| (unescape(k), v.clone()))).collect()
        };
        let health = if let Some(p) = fields.get("health.http") {
            Some(Health::Http(p.clone()))
        } else if fields.contains_key("health.tcp") {
            Some(Health::Tcp(true))
        } else if fields.contains_key("health.exec") {
            Some(Health::Exec(list("health.exec")))
        } else {
            None
        };
        let prestop = if let Some(p) = fields.get("prestop.http") {
            Some(PreStop::Http(p.clone()))
        } else if fields.contains_key("prestop.exec") {
            Some(PreStop::Exec(list("prestop.exec")))
        } else {
            None
        };
        let spec = InstanceSpec {
            service: get("service")?,
            version: get("version")?,
            port: u16::try_from(num("port")?).map_err(|_| "`port` is out of range".to_string())?,
            run: RunSpec { command: list("run.command"), env: map("run.env") },
            health,
            prestop,
            drain_deadline: Duration::from_millis(num("drain_deadline_ms")?),
            grace: Duration::from_millis(num("grace_ms")?),
            config: map("config"),
        };
        Ok(Self {
            id: get("id")?,
            address: get("address")?.parse().map_err(|_| "`address` is not an IPv4 address".to_string())?,
            pid: u32::try_from(num("pid")?).map_err(|_| "`pid` is out of range".to_string())?,
            phase: if get("phase")? == "serving" { Phase::Serving } else { Phase::Starting },
            spec,
        })
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '=' => out.push_str("\\e"),
            c => out.push(c),
        }
    }
    out
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
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('e') => out.push('='),
            Some(c) => out.push(c),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            service: "cart".into(),
            version: "v2".into(),
            port: 8080,
            run: RunSpec {
                command: vec!["./cart".into(), "--listen".into(), "{address}:{port}".into(), "a=b\\c\nd".into()],
                env: [("MODE".to_string(), "fast=yes".to_string())].into(),
            },
            health: Some(Health::Exec(vec!["check".into(), "".into()])),
            prestop: Some(PreStop::Http("/drain".into())),
            drain_deadline: Duration::from_secs(30),
            grace: Duration::from_millis(2500),
            config: [("cache=size".to_string(), "128\n".to_string())].into(),
        }
    }

    #[test]
    fn round_trips_awkward_values() {
        let r = Record {
            id: "cart-1".into(),
            address: Ipv4Addr::new(127, 1, 0, 7),
            pid: 4242,
            phase: Phase::Serving,
            spec: spec(),
        };
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let mut r2 = r.clone();
        r2.spec.health = Some(Health::Tcp(true));
        r2.spec.prestop = None;
        r2.phase = Phase::Starting;
        assert_eq!(Record::decode(&r2.encode()).unwrap(), r2);
        r2.spec.health = None;
        r2.spec.prestop = Some(PreStop::Exec(vec!["x".into()]));
        assert_eq!(Record::decode(&r2.encode()).unwrap(), r2);
    }

    #[test]
    fn reports_what_is_wrong() {
        assert!(Record::decode("something else\n").unwrap_err().contains("first line"));
        assert!(Record::decode(&format!("{HEADER}\nid=x\n")).unwrap_err().contains("no `service`"));
        assert!(Record::decode(&format!("{HEADER}\nnonsense\n")).unwrap_err().contains("line 2"));
    }
}
