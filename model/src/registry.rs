//! The registry file: what an agent steers (static mode), or what `hitless registry
//! apply` loads into the coordinator. One format for both.
//!
//! ```yaml
//! services:
//!   - name: cart
//!     vips: ["127.77.0.1:8080", "[::1]:18080"]
//!     policy: steer          # steer | reject | allow
//!     protocol: tcp          # tcp | udp (default tcp)
//!     backends:
//!       - { address: "127.0.1.1:8080", state: serving, weight: 100, version: v1 }
//! ```
//!
//! Parsing is pure and all-or-nothing: a text either validates completely into a
//! [`Registry`] or yields every problem found, each naming its field path.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_yaml::Value;

use crate::decode::{field, Decoder};
use crate::error::{FieldError, ModelError, Quoted};

/// Largest backend weight; weights are relative, so this only catches typos.
pub const MAX_WEIGHT: u64 = 1_000_000;

/// What a direct connect to a draining or down backend does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Steer it to a serving sibling of the same service.
    #[default]
    Steer,
    /// Refuse it at once (`ECONNREFUSED`).
    Reject,
    /// Leave it alone.
    Allow,
}

/// Transport of a service's VIPs and backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP, connected or not.
    Udp,
}

/// State of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendState {
    /// Gets new connections.
    #[default]
    Serving,
    /// Keeps its open connections, gets no new ones.
    Draining,
    /// Gets nothing; direct connects are steered or refused.
    Down,
}

/// A validated registry: services with VIPs and backends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registry {
    /// Services in file order.
    pub services: Vec<ServiceSpec>,
}

/// One service of a [`Registry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// Addresses clients dial.
    pub vips: Vec<SocketAddr>,
    /// Transport.
    pub protocol: Protocol,
    /// Direct-connect policy.
    pub policy: Policy,
    /// Instances.
    pub backends: Vec<BackendSpec>,
}

/// One backend of a [`ServiceSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where the instance listens.
    pub address: SocketAddr,
    /// Its state.
    pub state: BackendState,
    /// Relative share of new connections while serving (0 = none).
    pub weight: u32,
    /// Free-form version label.
    pub version: Option<String>,
}

const FILE_FIELDS: &[&str] = &["services"];
const SERVICE_FIELDS: &[&str] = &["name", "vips", "protocol", "policy", "backends"];
const BACKEND_FIELDS: &[&str] = &["address", "state", "weight", "version"];

impl Registry {
    /// Parses and validates a registry file's text; every problem is reported at once.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let root: Value = serde_yaml::from_str(text).map_err(|e| {
            let at = e.location().map(|l| format!(" at line {} column {}", l.line(), l.column())).unwrap_or_default();
            ModelError::Syntax(FieldError::new("(file)", format!("not valid YAML{at}: {e}"), "fix the YAML syntax"))
        })?;
        let mut d = Decoder::default();
        let mut check = Checks::default();
        let mut services = Vec::new();
        if let Some(m) = d.mapping("", &root, FILE_FIELDS, "services: [...]") {
            if let Some(list) = d.required("", m, "services", "[]").and_then(|v| d.seq("services", v, "[]")) {
                for (i, s) in list.iter().enumerate() {
                    if let Some(s) = service(&mut d, &mut check, &format!("services[{i}]"), i, s) {
                        services.push(s);
                    }
                }
            }
        }
        if d.errors.is_empty() {
            Ok(Self { services })
        } else {
            Err(ModelError::Invalid(d.errors))
        }
    }

    /// The backends of service `name`, if it is in the registry.
    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// Cross-entry checks: unique names, each address used once per protocol.
#[derive(Default)]
struct Checks {
    names: HashMap<String, usize>,
    used: HashMap<(SocketAddr, Protocol), String>,
}

impl Checks {
    fn claim(&mut self, d: &mut Decoder, addr: SocketAddr, proto: Protocol, path: &str) {
        // An IPv4 address and its IPv4-mapped IPv6 form are one key in the datapath.
        let canon = match addr {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => addr,
            },
            SocketAddr::V4(_) => addr,
        };
        if let Some(first) = self.used.get(&(canon, proto)) {
            d.push(
                path,
                format!("{addr} is already used at {first}"),
                "an address can be one VIP or one backend, once in the whole file; remove the duplicate",
            );
        } else {
            self.used.insert((canon, proto), path.to_owned());
        }
    }
}

fn service(d: &mut Decoder, check: &mut Checks, at: &str, index: usize, v: &Value) -> Option<ServiceSpec> {
    let m = d.mapping(at, v, SERVICE_FIELDS, "{ name: cart, vips: [...], backends: [...] }")?;
    let name = d.required(at, m, "name", "cart").and_then(|v| d.string(&field(at, "name"), v, "cart"));
    if let Some(n) = &name {
        if !valid_name(n) {
            d.push(
                field(at, "name"),
                format!("{} is not a valid service name", Quoted(n)),
                "use 1 to 63 lowercase letters, digits and '-', starting with a letter",
            );
        } else if let Some(first) = check.names.insert(n.clone(), index) {
            check.names.insert(n.clone(), first);
            d.push(
                field(at, "name"),
                format!("service {} is already defined at services[{first}]", Quoted(n)),
                "give each service a unique name, or merge the two entries",
            );
        }
    }
    let protocol = match m.get("protocol") {
        None => Some(Protocol::Tcp),
        Some(v) => choice(d, &field(at, "protocol"), v, PROTOCOLS),
    };
    let policy = match m.get("policy") {
        None => Some(Policy::Steer),
        Some(v) => choice(d, &field(at, "policy"), v, POLICIES),
    };
    let proto = protocol.unwrap_or_default();

    let mut vips = Vec::new();
    if let Some(list) = m.get("vips").and_then(|v| d.strings(&field(at, "vips"), v, "[\"127.77.0.1:8080\"]")) {
        for (j, text) in list.iter().enumerate() {
            let path = format!("{at}.vips[{j}]");
            if let Some(addr) = socket_addr(d, &path, text) {
                check.claim(d, addr, proto, &path);
                vips.push(addr);
            }
        }
    }
    let mut backends = Vec::new();
    if let Some(list) =
        m.get("backends").and_then(|v| d.seq(&field(at, "backends"), v, "[{ address: \"127.0.1.1:8080\" }]"))
    {
        for (j, b) in list.iter().enumerate() {
            if let Some(b) = backend(d, check, &format!("{at}.backends[{j}]"), proto, b) {
                backends.push(b);
            }
        }
    }
    // An AF_INET socket cannot be steered to an IPv6 backend.
    if !backends.is_empty() && !backends.iter().any(|b: &BackendSpec| b.address.is_ipv4()) {
        for (j, v) in vips.iter().enumerate().filter(|(_, v)| v.is_ipv4()) {
            d.push(
                format!("{at}.vips[{j}]"),
                format!("IPv4 VIP {v} but every backend is IPv6"),
                "add an IPv4 backend or give the service an IPv6 VIP",
            );
        }
    }
    Some(ServiceSpec { name: name?, vips, protocol: protocol?, policy: policy?, backends })
}

fn backend(d: &mut Decoder, check: &mut Checks, at: &str, proto: Protocol, v: &Value) -> Option<BackendSpec> {
    let m = d.mapping(at, v, BACKEND_FIELDS, "{ address: \"127.0.1.1:8080\", weight: 100 }")?;
    let address = d
        .required(at, m, "address", "\"127.0.1.1:8080\"")
        .and_then(|v| d.string(&field(at, "address"), v, "\"127.0.1.1:8080\""))
        .and_then(|text| socket_addr(d, &field(at, "address"), &text));
    if let Some(a) = address {
        check.claim(d, a, proto, &field(at, "address"));
    }
    let state = match m.get("state") {
        None => Some(BackendState::Serving),
        Some(v) => choice(
            d,
            &field(at, "state"),
            v,
            &[("serving", BackendState::Serving), ("draining", BackendState::Draining), ("down", BackendState::Down)],
        ),
    };
    let weight = match m.get("weight") {
        None => Some(100),
        Some(v) => d.count(&field(at, "weight"), v, MAX_WEIGHT, "weight").map(|w| w as u32),
    };
    let version = match m.get("version") {
        None => Some(None),
        Some(v) => d.scalar_text(&field(at, "version"), v).map(Some),
    };
    Some(BackendSpec { address: address?, state: state?, weight: weight?, version: version? })
}

/// One of a fixed set of words.
/// The values of a service's `protocol`, as files spell them.
pub(crate) const PROTOCOLS: &[(&str, Protocol)] = &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];
/// The values of a service's `policy`, as files spell them.
pub(crate) const POLICIES: &[(&str, Policy)] =
    &[("steer", Policy::Steer), ("reject", Policy::Reject), ("allow", Policy::Allow)];

/// One of `options` by its name; an unknown one is reported with the closest name.
pub(crate) fn choice<T: Copy>(d: &mut Decoder, path: &str, v: &Value, options: &[(&str, T)]) -> Option<T> {
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    let text = d.string(path, v, names[0])?;
    if let Some((_, t)) = options.iter().find(|(n, _)| *n == text) {
        return Some(*t);
    }
    let fix = match crate::decode::did_you_mean(&text, &names) {
        Some(s) => format!("did you mean `{s}`? (one of {})", names.join(", ")),
        None => format!("use one of {}", names.join(", ")),
    };
    d.push(path, format!("unknown value {}", Quoted(&text)), fix);
    None
}

/// Whether `name` is a valid service name: 1 to 63 lowercase letters, digits and `-`,
/// starting with a letter.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Whether `name` is a valid node name: 1 to 253 lowercase letters, digits, `-`, `.`
/// or `_`, starting and ending with a letter or digit — every Kubernetes node name
/// (a DNS subdomain, e.g. `ip-10-0-0-1.ec2.internal`) is one. It names the node's pin
/// directory, and agents introduce themselves by it.
pub fn valid_node_name(name: &str) -> bool {
    let b = name.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 253
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || b"-._".contains(c))
}

/// How to write a node name, for error messages.
pub const NODE_NAME_FIX: &str = "use 1 to 253 lowercase letters, digits, '-', '.' or '_', starting and ending with a letter or digit (a Kubernetes node name works)";

fn socket_addr(d: &mut Decoder, path: &str, text: &str) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => {
            d.push(path, format!("{} has port 0", Quoted(text)), "give the real port, e.g. 127.0.1.1:8080");
            None
        }
        Ok(a) if a.ip().is_unspecified() => {
            d.push(
                path,
                format!("{} is the unspecified address", Quoted(text)),
                "give the address clients dial, e.g. 127.0.1.1:8080",
            );
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            d.push(
                path,
                format!("{} is not an IP address with a port", Quoted(text)),
                "write it as 127.0.1.1:8080 or [::1]:8080 (no host names)",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        Registry::parse(text).expect_err("should be rejected").problems().iter().map(ToString::to_string).collect()
    }

    const GOOD: &str = r#"
services:
  - name: cart
    vips: ["127.77.0.1:8080", "[::1]:18080"]
    policy: steer
    backends:
      - { address: "127.0.1.1:8080", state: serving, weight: 100, version: v1 }
      - { address: "127.0.1.2:8080", state: draining, weight: 100, version: v1 }
  - name: dns
    protocol: udp
    vips: ["127.77.0.2:53"]
    backends:
      - { address: "127.0.1.1:8080" }
"#;

    #[test]
    fn parses_the_design_example() {
        let r = Registry::parse(GOOD).unwrap();
        assert_eq!(r.services.len(), 2);
        let cart = r.service("cart").unwrap();
        assert_eq!(cart.vips[1], "[::1]:18080".parse::<SocketAddr>().unwrap());
        assert_eq!(cart.backends[1].state, BackendState::Draining);
        assert_eq!(cart.backends[1].version.as_deref(), Some("v1"));
        // Same address, other protocol: allowed. Defaults apply.
        let dns = r.service("dns").unwrap();
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.backends[0].weight, 100);
        assert_eq!(dns.policy, Policy::Steer);
    }

    #[test]
    fn unknown_field_names_its_path_and_suggests() {
        let p =
            problems("services:\n  - name: cart\n    backends:\n      - { address: \"127.0.1.1:80\", wieght: 5 }\n");
        assert_eq!(p, vec!["services[0].backends[0].wieght: unknown field `wieght`; did you mean `weight`?"]);
    }

    #[test]
    fn wrong_type_and_bad_values_name_their_paths() {
        let p = problems("services:\n  - name: cart\n    policy: stear\n    backends:\n      - { address: \"127.0.1.1:80\", weight: heavy, state: gone }\n");
        let joined = p.join("\n");
        assert!(joined.contains("services[0].policy: unknown value \"stear\"; did you mean `steer`?"), "{joined}");
        assert!(joined.contains("services[0].backends[0].weight: expected a whole number"), "{joined}");
        assert!(joined.contains("services[0].backends[0].state: unknown value \"gone\""), "{joined}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let p = problems(
            r#"
services:
  - name: cart
    vips: ["127.77.0.1:8080", "not-an-address"]
    backends:
      - { address: "127.0.1.1:8080" }
      - { address: "127.0.1.1:8080" }
      - { address: "127.0.1.3:8080", weight: -1 }
  - name: cart
    vips: ["127.77.0.1:8080"]
  - name: Bad_Name
  - vips: []
"#,
        );
        let joined = p.join("\n");
        for want in [
            "services[0].vips[1]: \"not-an-address\" is not an IP address",
            "services[0].backends[1].address: 127.0.1.1:8080 is already used at services[0].backends[0].address",
            "services[0].backends[2].weight: weight -1 is negative",
            "services[1].name: service \"cart\" is already defined at services[0]",
            "services[1].vips[0]: 127.77.0.1:8080 is already used at services[0].vips[0]",
            "services[2].name: \"Bad_Name\" is not a valid service name",
            "services[3].name: is missing",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        assert_eq!(p.len(), 7, "{joined}");
    }

    #[test]
    fn ipv4_vip_needs_an_ipv4_backend() {
        let p = problems(
            "services:\n  - name: a\n    vips: [\"127.77.0.1:80\"]\n    backends: [{ address: \"[::1]:80\" }]\n",
        );
        assert!(p[0].starts_with("services[0].vips[0]: IPv4 VIP"), "{p:?}");
    }

    #[test]
    fn mapped_and_plain_ipv4_are_the_same_address() {
        let p = problems(
            "services:\n  - name: a\n    backends: [{ address: \"127.0.1.1:80\" }, { address: \"[::ffff:127.0.1.1]:80\" }]\n",
        );
        assert!(p[0].contains("already used"), "{p:?}");
    }

    #[test]
    fn yaml_syntax_errors_name_the_line() {
        let p = problems("services: [\n");
        assert!(p[0].starts_with("(file): not valid YAML at line"), "{p:?}");
    }
}
