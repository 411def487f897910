//! `hitless node list|remove`: the node roster.

use clap::Subcommand;
use hitless_proto::v1::{self as pb};

use super::{coordinator_client, runtime, status_error, RemoteError, Target};

/// `hitless node ...`.
#[derive(Subcommand)]
pub enum NodeCommand {
    /// Print the node roster: every node whose agent said hello, connected or not, with
    /// its last contact.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Retire a node from the roster (rollouts stop waiting for it). Refused while its
    /// agent is connected or it runs registered instances, unless --force.
    Remove {
        /// Node name.
        node: String,
        /// Remove it anyway: a connected agent's session ends (it joins again at its
        /// next hello); its registered instances stay registered.
        #[arg(long)]
        force: bool,
    },
}

/// `node list|remove`.
pub fn node(to: &Target, cmd: &NodeCommand) -> Result<(), RemoteError> {
    runtime()?.block_on(async {
        let mut client = coordinator_client(to).await?;
        match cmd {
            NodeCommand::List { output } => {
                let r = client.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner();
                if output == "json" {
                    let nodes: Vec<serde_json::Value> = r
                        .nodes
                        .iter()
                        .map(|n| {
                            serde_json::json!({
                                "node": n.node, "connected": n.connected, "applied_revision": n.applied_revision,
                                "last_contact_ms_ago": n.last_contact_ms_ago,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::json!({ "nodes": nodes }));
                } else {
                    println!("{:<24} {:<12} {:>10} {:>16}", "NODE", "AGENT", "APPLIED", "LAST CONTACT");
                    for n in &r.nodes {
                        let agent = if n.connected { "connected" } else { "LOST" };
                        let ago = hitless_model::Duration::from_millis(n.last_contact_ms_ago);
                        println!("{:<24} {:<12} {:>10} {:>12} ago", n.node, agent, n.applied_revision, ago.to_string());
                    }
                }
            }
            NodeCommand::Remove { node, force } => {
                let r = client
                    .remove_node(pb::RemoveNodeRequest { node: node.clone(), force: *force })
                    .await
                    .map_err(|s| match s.code() {
                        tonic::Code::FailedPrecondition => RemoteError::Failed(anyhow::anyhow!("{}", s.message())),
                        _ => status_error(s),
                    })?
                    .into_inner();
                println!("node {node} removed from the roster");
                if r.was_connected {
                    println!("its agent was connected: its session ended, and it joins again at its next hello");
                }
                if !r.still_registered.is_empty() {
                    let list: Vec<String> =
                        r.still_registered.iter().map(|k| format!("{} {}", k.service, k.address)).collect();
                    println!(
                        "still registered on it: {} (rollouts wait for a node that runs registered instances: deregister them)",
                        list.join(", ")
                    );
                }
            }
        }
        Ok(())
    })
}
