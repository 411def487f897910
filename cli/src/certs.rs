//! `hitless certs init|issue`: a CA of the cluster's own and the certificates of the
//! coordinator, the agents and the operators (see `hitless_tls::identity` for the
//! URI SANs that carry node names and roles, which any other PKI can issue as well).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hitless_tls::identity::{valid_name, Identity, Role, NAME_RULE};

use crate::remote::RemoteError;

/// `hitless certs ...`.
#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a CA (ca.pem, ca-key.pem) and the coordinator's certificate
    /// (coordinator.pem, coordinator-key.pem; SANs: --san hosts, localhost, 127.0.0.1).
    Init {
        /// Directory to write (created if missing; refused if it already holds a CA).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A host name or IP address clients reach the coordinator by. Repeatable.
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
    },
    /// Issue (or reissue: rotate) a certificate from the CA in --dir: node-NAME.pem for
    /// an agent, operator-NAME.pem for a person or tool.
    Issue(IssueArgs),
}

/// `hitless certs issue`.
#[derive(Args)]
pub struct IssueArgs {
    /// Directory with ca.pem and ca-key.pem (from `hitless certs init`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The agent of this node (its --node name).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["operator", "role"], required_unless_present = "operator")]
    node: Option<String>,
    /// A person or tool of this name.
    #[arg(long, value_name = "NAME", requires = "role")]
    operator: Option<String>,
    /// The operator's role: viewer (read), operator (rollouts, drains), admin (registry, roster).
    #[arg(long, value_name = "ROLE", value_parser = ["viewer", "operator", "admin"])]
    role: Option<String>,
}

/// Runs `certs init|issue`, printing the files written.
pub fn run(cmd: &CertsCommand) -> Result<(), RemoteError> {
    let written = match cmd {
        CertsCommand::Init { dir, sans } => {
            hitless_tls::issue::init(dir, sans).map_err(|e| RemoteError::BadInput(e.to_string()))?
        }
        CertsCommand::Issue(a) => {
            let identity = match (&a.node, &a.operator, a.role.as_deref().and_then(Role::parse)) {
                (Some(n), None, _) => checked(n, "--node").map(|n| Identity::Node(n.to_owned()))?,
                (None, Some(o), Some(role)) => {
                    checked(o, "--operator").map(|o| Identity::Operator { name: o.to_owned(), role })?
                }
                _ => {
                    return Err(RemoteError::BadInput(
                        "give --node NAME, or --operator NAME --role viewer|operator|admin".into(),
                    ))
                }
            };
            let (cert, key) =
                hitless_tls::issue::issue(&a.dir, &identity).map_err(|e| RemoteError::BadInput(e.to_string()))?;
            println!("{identity}: {}", identity.uri());
            vec![cert, key]
        }
    };
    for f in written {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn checked<'a>(name: &'a str, flag: &str) -> Result<&'a str, RemoteError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(RemoteError::BadInput(format!("{flag} {name:?}: not a name; {NAME_RULE}")))
    }
}
