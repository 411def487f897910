//! Who a certificate speaks for: a node's agent, a person or tool with a role, or the
//! coordinator. The identity is a URI subject alternative name in the SPIFFE form, so
//! any PKI that can put a URI in a certificate (cert-manager's `uris:`, SPIRE, step-ca,
//! an openssl config's `subjectAltName = URI:...`) issues hitless certificates by
//! configuration alone:
//!
//! | identity | URI SAN |
//! | --- | --- |
//! | the agent of node NAME | `spiffe://hitless/node/NAME` |
//! | operator NAME with role ROLE | `spiffe://hitless/operator/NAME/ROLE` (ROLE: viewer, operator, admin) |
//! | the coordinator | `spiffe://hitless/coordinator` (clients check its DNS or IP SAN) |

use std::fmt;

/// The trust domain and scheme every hitless identity URI starts with.
pub const URI_PREFIX: &str = "spiffe://hitless/";

/// What a person's or tool's certificate may do, each role including the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read: status, plan, pull, registry list and watch, node list.
    Viewer,
    /// Change rollouts and instance states: push, pause, resume, promote, abort, drain, undrain.
    Operator,
    /// Change the registry and the roster: registry apply, register, deregister, node remove.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The role's name as certificates and flags spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role named `s`, if any.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who a verified certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The agent of one node.
    Node(String),
    /// A person or tool, with a role.
    Operator {
        /// The operator's name.
        name: String,
        /// What it may do.
        role: Role,
    },
    /// The coordinator itself.
    Coordinator,
}

impl Identity {
    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Node(n) => format!("{URI_PREFIX}node/{n}"),
            Identity::Operator { name, role } => format!("{URI_PREFIX}operator/{name}/{role}"),
            Identity::Coordinator => format!("{URI_PREFIX}coordinator"),
        }
    }

    /// The identity a URI SAN names, if it is a hitless one.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["node", name] if valid_name(name) => Some(Identity::Node((*name).to_owned())),
            ["operator", name, role] if valid_name(name) => {
                Some(Identity::Operator { name: (*name).to_owned(), role: Role::parse(role)? })
            }
            ["coordinator"] => Some(Identity::Coordinator),
            _ => None,
        }
    }

    /// The first hitless identity among a certificate's URI SANs.
    pub fn from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Option<Identity> {
        uris.into_iter().find_map(Identity::from_uri)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(n) => write!(f, "node {n}"),
            Identity::Operator { name, role } => write!(f, "operator {name} ({role})"),
            Identity::Coordinator => f.write_str("the coordinator"),
        }
    }
}

/// A node or operator name as an identity may carry it: 1-253 of lowercase letters,
/// digits, '-', '.', '_' (Kubernetes node names), starting and ending with a letter or
/// digit. Nothing else: a name is a path segment of the URI and part of file names.
pub fn valid_name(s: &str) -> bool {
    let ok_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'))
        && ok_end(s.chars().next())
        && ok_end(s.chars().last())
}

/// What a name may be, for error messages.
pub const NAME_RULE: &str =
    "1-253 lowercase letters, digits, '-', '.' or '_', starting and ending with a letter or digit";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        for id in [
            Identity::Node("ip-10-0-0-1.ec2.internal".into()),
            Identity::Operator { name: "ana".into(), role: Role::Operator },
            Identity::Operator { name: "ci_bot".into(), role: Role::Viewer },
            Identity::Coordinator,
        ] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id.clone()), "{}", id.uri());
        }
    }

    #[test]
    fn foreign_or_malformed_uris_are_no_identity() {
        for uri in [
            "spiffe://other/node/a",
            "spiffe://hitless/node/",
            "spiffe://hitless/node/a/b",
            "spiffe://hitless/node/A",
            "spiffe://hitless/node/..",
            "spiffe://hitless/operator/ana",
            "spiffe://hitless/operator/ana/root",
            "spiffe://hitless/operator/ana/admin/x",
            "https://hitless/node/a",
        ] {
            assert_eq!(Identity::from_uri(uri), None, "{uri}");
        }
    }

    #[test]
    fn roles_are_ordered_lowest_first() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        assert_eq!(Role::parse("admin"), Some(Role::Admin));
        assert_eq!(Role::parse("root"), None);
    }
}
