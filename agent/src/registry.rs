//! The registry file of static mode: what one agent steers, validated as a whole.
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
//! Parsing never touches the datapath: a file either validates completely into a
//! [`Registry`] or yields every problem found, each naming its field path.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

/// Largest backend weight; weights are relative, so this only catches typos.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// One problem in an input file: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `services[0].backends[1].address`.
    pub path: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

/// A registry file that cannot be used; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file is not YAML of the expected shape (the first such problem).
    #[error("{0}")]
    Shape(FieldError),
    /// The file parsed, but these fields are wrong (all of them).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

impl RegistryError {
    /// Every problem, one per entry.
    pub fn problems(&self) -> Vec<FieldError> {
        match self {
            Self::Shape(e) => vec![e.clone()],
            Self::Invalid(v) => v.clone(),
        }
    }
}

/// What a direct connect to a draining or down backend does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP, connected or not.
    Udp,
}

/// State of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    #[serde(default)]
    state: BackendState,
    weight: Option<i64>,
    version: Option<String>,
}

/// Parses and validates a registry file's text.
pub fn parse(text: &str) -> Result<Registry, RegistryError> {
    let raw: RawFile = serde_yaml::from_str(text).map_err(|e| RegistryError::Shape(shape_error(&e)))?;
    let mut errors = Vec::new();
    let mut services = Vec::with_capacity(raw.services.len());
    let mut names: HashMap<&str, usize> = HashMap::new();
    // (address, protocol) -> where it was first used, across the whole file.
    let mut used: HashMap<(SocketAddr, Protocol), String> = HashMap::new();

    for (i, s) in raw.services.iter().enumerate() {
        let at = format!("services[{i}]");
        if !valid_name(&s.name) {
            errors.push(err(
                format!("{at}.name"),
                format!("{:?} is not a valid service name", s.name),
                "use 1 to 63 lowercase letters, digits and '-', starting with a letter",
            ));
        } else if let Some(first) = names.insert(&s.name, i) {
            errors.push(err(
                format!("{at}.name"),
                format!("service {:?} is already defined at services[{first}]", s.name),
                "give each service a unique name, or merge the two entries",
            ));
        }

        let mut vips = Vec::with_capacity(s.vips.len());
        for (j, v) in s.vips.iter().enumerate() {
            let path = format!("{at}.vips[{j}]");
            if let Some(addr) = socket_addr(v, &path, &mut errors) {
                claim(&mut used, addr, s.protocol, &path, &mut errors);
                vips.push(addr);
            }
        }

        let mut backends = Vec::with_capacity(s.backends.len());
        for (j, b) in s.backends.iter().enumerate() {
            let path = format!("{at}.backends[{j}]");
            let Some(address) = socket_addr(&b.address, &format!("{path}.address"), &mut errors) else {
                continue;
            };
            claim(&mut used, address, s.protocol, &format!("{path}.address"), &mut errors);
            let weight = match b.weight {
                None => 100,
                Some(w) if (0..=i64::from(MAX_WEIGHT)).contains(&w) => w as u32,
                Some(w) => {
                    errors.push(err(
                        format!("{path}.weight"),
                        format!("weight {w} is out of range"),
                        format!("use 0 (no new connections) to {MAX_WEIGHT}; weights are relative"),
                    ));
                    continue;
                }
            };
            backends.push(BackendSpec { address, state: b.state, weight, version: b.version.clone() });
        }

        // An AF_INET socket cannot be steered to an IPv6 backend.
        let has_v4_backend = backends.iter().any(|b| b.address.is_ipv4());
        for (j, v) in vips.iter().enumerate() {
            if v.is_ipv4() && !backends.is_empty() && !has_v4_backend {
                errors.push(err(
                    format!("{at}.vips[{j}]"),
                    format!("IPv4 VIP {v} but every backend is IPv6"),
                    "add an IPv4 backend or give the service an IPv6 VIP",
                ));
            }
        }

        services.push(ServiceSpec { name: s.name.clone(), vips, protocol: s.protocol, policy: s.policy, backends });
    }

    if errors.is_empty() {
        Ok(Registry { services })
    } else {
        Err(RegistryError::Invalid(errors))
    }
}

fn err(path: String, problem: String, fix: impl Into<String>) -> FieldError {
    FieldError { path, problem, fix: fix.into() }
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn socket_addr(text: &str, path: &str, errors: &mut Vec<FieldError>) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => {
            errors.push(err(path.into(), format!("{text:?} has port 0"), "give the real port, e.g. 127.0.1.1:8080"));
            None
        }
        Ok(a) if a.ip().is_unspecified() => {
            errors.push(err(
                path.into(),
                format!("{text:?} is the unspecified address"),
                "give the address clients dial, e.g. 127.0.1.1:8080",
            ));
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(err(
                path.into(),
                format!("{text:?} is not an IP address with a port"),
                "write it as 127.0.1.1:8080 or [::1]:8080 (no host names)",
            ));
            None
        }
    }
}

fn claim(
    used: &mut HashMap<(SocketAddr, Protocol), String>,
    addr: SocketAddr,
    proto: Protocol,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    // An IPv4 address and its IPv4-mapped IPv6 form are the same key in the datapath.
    let canon = match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    };
    if let Some(first) = used.get(&(canon, proto)) {
        errors.push(err(
            path.into(),
            format!("{addr} is already used at {first}"),
            "an address can be one VIP or one backend, once in the whole file; remove the duplicate",
        ));
    } else {
        used.insert((canon, proto), path.to_owned());
    }
}

/// Turns a serde_yaml error into a field error: serde_yaml prefixes its message with
/// the path (`services[0].backends[1]: unknown field ...`) and ends it with a location.
fn shape_error(e: &serde_yaml::Error) -> FieldError {
    let text = e.to_string();
    let (path, rest) = match text.split_once(": ") {
        Some((p, r)) if !p.contains(' ') => (p.to_owned(), r.to_owned()),
        _ => ("(file)".to_owned(), text.clone()),
    };
    let fix = if rest.contains("unknown field") {
        "remove the field or fix its spelling (the expected names are listed)"
    } else if rest.contains("unknown variant") {
        "use one of the listed values"
    } else if rest.contains("missing field") {
        "add the field"
    } else if rest.contains("invalid type") {
        "give the field a value of the expected type"
    } else {
        "see the registry file format in the README"
    };
    err(path, rest, fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse(text).expect_err("should be rejected").problems().iter().map(ToString::to_string).collect()
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
        let r = parse(GOOD).unwrap();
        assert_eq!(r.services.len(), 2);
        let cart = &r.services[0];
        assert_eq!(cart.vips[1], "[::1]:18080".parse::<SocketAddr>().unwrap());
        assert_eq!(cart.backends[1].state, BackendState::Draining);
        // Same address, other protocol: allowed. Defaults apply.
        let dns = &r.services[1];
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.backends[0].weight, 100);
        assert_eq!(dns.policy, Policy::Steer);
    }

    #[test]
    fn unknown_field_names_its_path() {
        let p =
            problems("services:\n  - name: cart\n    backends:\n      - { address: \"127.0.1.1:80\", wieght: 5 }\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("services[0].backends[0]: unknown field `wieght`"), "{p:?}");
        assert!(p[0].contains("weight"), "lists the expected names: {p:?}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let p = problems(
            "services:\n  - name: cart\n    backends:\n      - { address: \"127.0.1.1:80\", weight: heavy }\n",
        );
        assert!(p[0].starts_with("services[0].backends[0].weight: invalid type"), "{p:?}");
    }

    #[test]
    fn bad_enum_value_names_its_path() {
        let p = problems("services:\n  - name: cart\n    policy: stear\n");
        assert!(p[0].starts_with("services[0].policy: unknown variant `stear`"), "{p:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
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
"#,
        );
        let joined = p.join("\n");
        for want in [
            "services[0].vips[1]: \"not-an-address\" is not an IP address",
            "services[0].backends[1].address: 127.0.1.1:8080 is already used at services[0].backends[0].address",
            "services[0].backends[2].weight: weight -1 is out of range",
            "services[1].name: service \"cart\" is already defined at services[0]",
            "services[1].vips[0]: 127.77.0.1:8080 is already used at services[0].vips[0]",
            "services[2].name: \"Bad_Name\" is not a valid service name",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        assert_eq!(p.len(), 6, "{joined}");
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
}
