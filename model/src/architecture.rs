//! The architecture file: what should run, service by service.
//!
//! ```yaml
//! nodes: [node-a, node-b]                 # optional; when given, placement must use these
//! services:
//!   - name: cart
//!     version: v2
//!     port: 8080
//!     vips: ["127.77.0.1:8080"]
//!     protocol: tcp                       # tcp | udp; optional (a new service: tcp)
//!     policy: steer                       # steer | reject | allow; optional (a new service: steer)
//!     run: { command: ["./cart", "--listen", "{address}:{port}"], env: { MODE: fast } }
//!     health: { http: /healthz }          # or { tcp: true } or { exec: [argv...] }
//!     prestop: { http: /drain }           # or { exec: [argv...] }; optional
//!     drain_deadline: 30s
//!     config: { cache_size: "128" }
//!     depends_on: [inventory]             # update providers before their consumers
//!     placement: { node-a: 2, node-b: 1 } # instances per node
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use crate::decode::{field, Decoder};
use crate::duration::Duration;
use crate::error::{FieldError, ModelError};
use crate::registry::{choice, Policy, Protocol, POLICIES, PROTOCOLS};
use crate::validate;

/// Largest number of instances of one service on one node; larger is a typo.
pub const MAX_INSTANCES_PER_NODE: u64 = 10_000;

/// A whole architecture: the services that should run and where.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    /// The nodes placements may name; empty means "any node name".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Services in file order.
    #[serde(default)]
    pub services: Vec<Service>,
}

/// One service: a versioned program, how to check and stop it, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name (lowercase letters, digits, `-`).
    pub name: String,
    /// Version label; instances of another version are replaced by a rollout.
    pub version: String,
    /// Port every instance listens on (at its own address).
    pub port: u16,
    /// Addresses clients dial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<SocketAddr>,
    /// Transport of the VIPs; `None`: the registry's (TCP for a new service). A rollout
    /// sets it only when the file names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// What a direct connect to a draining or down instance does; `None`: the registry's
    /// (steer for a new service), so a rollout keeps what `registry apply` set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// How to start an instance.
    pub run: RunSpec,
    /// How to tell an instance is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Called when an instance starts draining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prestop: Option<PreStop>,
    /// Longest wait for open connections to finish before the instance is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<Duration>,
    /// Free-form configuration pairs handed to instances.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Services this one calls; they are updated first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Instances per node.
    #[serde(default)]
    pub placement: BTreeMap<String, u32>,
}

impl Service {
    /// Stands in for an entry that failed to decode (its problems are already reported), so
    /// that later entries keep their index in error paths.
    fn placeholder() -> Self {
        Self {
            name: String::new(),
            version: String::new(),
            port: 0,
            vips: Vec::new(),
            protocol: None,
            policy: None,
            run: RunSpec { command: Vec::new(), env: BTreeMap::new() },
            health: None,
            prestop: None,
            drain_deadline: None,
            config: BTreeMap::new(),
            depends_on: Vec::new(),
            placement: BTreeMap::new(),
        }
    }

    /// Total instances over all nodes.
    pub fn instances(&self) -> u64 {
        self.placement.values().map(|&n| u64::from(n)).sum()
    }
}

/// How an instance is started: an argv (no shell) and its environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Program and arguments; `{address}` and `{port}` are replaced per instance.
    pub command: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Readiness check of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// An HTTP GET of this path answers 2xx.
    Http(String),
    /// The port accepts a TCP connection.
    Tcp(bool),
    /// This argv exits 0.
    Exec(Vec<String>),
}

/// Hook called when an instance starts draining, before it is stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreStop {
    /// An HTTP GET of this path.
    Http(String),
    /// This argv.
    Exec(Vec<String>),
}

const TOP_FIELDS: &[&str] = &["nodes", "services"];
const SERVICE_FIELDS: &[&str] = &[
    "name",
    "version",
    "port",
    "vips",
    "protocol",
    "policy",
    "run",
    "health",
    "prestop",
    "drain_deadline",
    "config",
    "depends_on",
    "placement",
];

impl Architecture {
    /// Parses and validates an architecture file's text; every problem is reported at once.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let value: Value = serde_yaml::from_str(text).map_err(|e| {
            let at = e.location().map(|l| format!(" at line {} column {}", l.line(), l.column())).unwrap_or_default();
            ModelError::Syntax(FieldError::new("(file)", format!("not valid YAML{at}: {e}"), "fix the YAML syntax"))
        })?;
        let mut d = Decoder::default();
        let arch = decode_architecture(&mut d, &value);
        if let Some(arch) = &arch {
            validate::check(arch, &mut d.errors);
        }
        match arch {
            Some(arch) if d.errors.is_empty() => Ok(arch),
            _ => Err(ModelError::Invalid(d.errors)),
        }
    }

    /// Validates an architecture built in code (the same checks as [`Architecture::parse`]
    /// after decoding).
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut errors = Vec::new();
        validate::check(self, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Invalid(errors))
        }
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The file form of this architecture.
    pub fn to_yaml(&self) -> String {
        let mut out = Vec::new();
        let mut ser = serde_yaml::Serializer::new(&mut out);
        // Enums as `{ http: /healthz }` rather than YAML tags, the form `parse` reads.
        // Serializing plain owned data with string keys into memory cannot fail.
        let _ = serde_yaml::with::singleton_map_recursive::serialize(self, &mut ser);
        String::from_utf8(out).unwrap_or_default()
    }
}

fn decode_architecture(d: &mut Decoder, v: &Value) -> Option<Architecture> {
    if v.is_null() {
        return Some(Architecture::default());
    }
    let top = d.mapping("", v, TOP_FIELDS, "`services: [...]`")?;
    let nodes = match top.get("nodes") {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(v) => d.strings("nodes", v, "[node-a, node-b]"),
    };
    let services = match top.get("services") {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(v) => d.seq("services", v, "a list of `- name: ...` entries").map(|items| {
            items
                .iter()
                .enumerate()
                .map(|(i, s)| decode_service(d, &format!("services[{i}]"), s).unwrap_or_else(Service::placeholder))
                .collect()
        }),
    };
    Some(Architecture { nodes: nodes?, services: services? })
}

fn decode_service(d: &mut Decoder, at: &str, v: &Value) -> Option<Service> {
    let m = d.mapping(at, v, SERVICE_FIELDS, "`{ name: cart, version: v1, ... }`")?;
    let name = d.required(at, m, "name", "cart").and_then(|v| d.string(&field(at, "name"), v, "cart"));
    let version = d.required(at, m, "version", "v1").and_then(|v| d.string(&field(at, "version"), v, "v1"));
    let port = d.required(at, m, "port", "8080").and_then(|v| decode_port(d, &field(at, "port"), v));
    let vips = opt(m, "vips").map_or(Some(Vec::new()), |v| decode_vips(d, &field(at, "vips"), v));
    let protocol = opt(m, "protocol").map_or(Some(None), |v| choice(d, &field(at, "protocol"), v, PROTOCOLS).map(Some));
    let policy = opt(m, "policy").map_or(Some(None), |v| choice(d, &field(at, "policy"), v, POLICIES).map(Some));
    let run = d.required(at, m, "run", "{ command: [./cart] }").and_then(|v| decode_run(d, &field(at, "run"), v));
    let health = opt(m, "health").map_or(Some(None), |v| decode_health(d, &field(at, "health"), v).map(Some));
    let prestop = opt(m, "prestop").map_or(Some(None), |v| decode_prestop(d, &field(at, "prestop"), v).map(Some));
    let drain_deadline =
        opt(m, "drain_deadline").map_or(Some(None), |v| d.duration(&field(at, "drain_deadline"), v).map(Some));
    let config =
        opt(m, "config").map_or(Some(BTreeMap::new()), |v| d.text_map(&field(at, "config"), v, "{ key: value }"));
    let depends_on =
        opt(m, "depends_on").map_or(Some(Vec::new()), |v| d.strings(&field(at, "depends_on"), v, "[inventory]"));
    let placement =
        opt(m, "placement").map_or(Some(BTreeMap::new()), |v| decode_placement(d, &field(at, "placement"), v));
    // A field that failed to decode was reported; a neutral value stands in for it so the
    // cross-field checks still run and every problem of the file is reported at once.
    Some(Service {
        name: name.unwrap_or_default(),
        version: version.unwrap_or_default(),
        port: port.unwrap_or(0),
        vips: vips.unwrap_or_default(),
        protocol: protocol.unwrap_or_default(),
        policy: policy.unwrap_or_default(),
        run: run.unwrap_or(RunSpec { command: Vec::new(), env: BTreeMap::new() }),
        health: health.unwrap_or_default(),
        prestop: prestop.unwrap_or_default(),
        drain_deadline: drain_deadline.unwrap_or_default(),
        config: config.unwrap_or_default(),
        depends_on: depends_on.unwrap_or_default(),
        placement: placement.unwrap_or_default(),
    })
}

/// An optional field, with `null` meaning absent.
fn opt<'a>(m: &'a Mapping, name: &str) -> Option<&'a Value> {
    m.get(name).filter(|v| !v.is_null())
}

fn decode_port(d: &mut Decoder, path: &str, v: &Value) -> Option<u16> {
    let n = d.count(path, v, u64::from(u16::MAX), "port")?;
    if n == 0 {
        d.push(path, "port 0 is not a port", "use the port instances listen on, 1 to 65535");
        return None;
    }
    u16::try_from(n).ok()
}

fn decode_vips(d: &mut Decoder, path: &str, v: &Value) -> Option<Vec<SocketAddr>> {
    let texts = d.strings(path, v, "[\"127.77.0.1:8080\"]")?;
    let mut out = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        match t.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => out.push(a),
            _ => d.push(
                format!("{path}[{i}]"),
                format!("{} is not an IP address with a port", crate::Quoted(t)),
                "write it as 127.77.0.1:8080 or [::1]:8080 (no host names, no port 0)",
            ),
        }
    }
    (out.len() == texts.len()).then_some(out)
}

fn decode_run(d: &mut Decoder, path: &str, v: &Value) -> Option<RunSpec> {
    let m = d.mapping(path, v, &["command", "env"], "`{ command: [./cart, --port, \"{port}\"] }`")?;
    let command = d.required(path, m, "command", "[./cart]").and_then(|v| {
        let cmd = d.strings(&field(path, "command"), v, "[./cart, --verbose]")?;
        if cmd.is_empty() || cmd[0].is_empty() {
            d.push(field(path, "command"), "the command is empty", "give the program and its arguments: [./cart]");
            return None;
        }
        Some(cmd)
    });
    let env = opt(m, "env").map_or(Some(BTreeMap::new()), |v| d.text_map(&field(path, "env"), v, "{ MODE: fast }"));
    Some(RunSpec { command: command?, env: env? })
}

/// A mapping with exactly one of `kinds` as its key.
fn one_of<'a>(d: &mut Decoder, path: &str, v: &'a Value, kinds: &[&str], example: &str) -> Option<(String, &'a Value)> {
    let m = d.mapping(path, v, kinds, example)?;
    let present: Vec<&str> = kinds.iter().copied().filter(|k| m.contains_key(*k)).collect();
    match present.as_slice() {
        [k] => m.get(*k).map(|v| ((*k).to_owned(), v)),
        // Only unknown keys: they were reported with a suggestion already.
        [] if !m.is_empty() => None,
        _ => {
            d.push(path, format!("give exactly one of {}", kinds.join(", ")), format!("write it as {example}"));
            None
        }
    }
}

fn decode_health(d: &mut Decoder, path: &str, v: &Value) -> Option<Health> {
    let (kind, v) =
        one_of(d, path, v, &["http", "tcp", "exec"], "{ http: /healthz }, { tcp: true } or { exec: [argv] }")?;
    let at = field(path, &kind);
    match kind.as_str() {
        "http" => http_path(d, &at, v).map(Health::Http),
        "tcp" => match v {
            Value::Bool(true) => Some(Health::Tcp(true)),
            _ => {
                d.push(at, "only `tcp: true` is meaningful", "write `{ tcp: true }`, or drop the health check");
                None
            }
        },
        _ => argv(d, &at, v).map(Health::Exec),
    }
}

fn decode_prestop(d: &mut Decoder, path: &str, v: &Value) -> Option<PreStop> {
    let (kind, v) = one_of(d, path, v, &["http", "exec"], "{ http: /drain } or { exec: [argv] }")?;
    let at = field(path, &kind);
    match kind.as_str() {
        "http" => http_path(d, &at, v).map(PreStop::Http),
        _ => argv(d, &at, v).map(PreStop::Exec),
    }
}

fn http_path(d: &mut Decoder, path: &str, v: &Value) -> Option<String> {
    let p = d.string(path, v, "/healthz")?;
    if p.starts_with('/') {
        Some(p)
    } else {
        d.push(path, format!("{} is not an HTTP path", crate::Quoted(&p)), "start it with '/', e.g. /healthz");
        None
    }
}

fn argv(d: &mut Decoder, path: &str, v: &Value) -> Option<Vec<String>> {
    let cmd = d.strings(path, v, "[./check, --quick]")?;
    if cmd.is_empty() {
        d.push(path, "the command is empty", "give the program and its arguments: [./check]");
        return None;
    }
    Some(cmd)
}

fn decode_placement(d: &mut Decoder, path: &str, v: &Value) -> Option<BTreeMap<String, u32>> {
    let Value::Mapping(m) = v else {
        d.push(path, "expected a mapping of node to instance count", "write it as { node-a: 2, node-b: 1 }");
        return None;
    };
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (k, n) in m {
        let Value::String(node) = k else {
            d.push(path, "a node name is not a string", "write node names as keys: { node-a: 2 }");
            ok = false;
            continue;
        };
        let at = field(path, node);
        match d.count(&at, n, MAX_INSTANCES_PER_NODE, "instance count") {
            // The bound keeps the count inside u32.
            Some(n) => {
                out.insert(node.clone(), u32::try_from(n).unwrap_or(u32::MAX));
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}
