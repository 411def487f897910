//! `hitless drain` / `hitless undrain`: an instance's state, through the barrier.

use clap::Args;
use hitless_model::Duration;
use hitless_proto::v1::{self as pb};

use super::{coordinator_client, runtime, status_error, RemoteError, Target};

/// `hitless drain` / `hitless undrain`.
#[derive(Args)]
pub struct DrainArgs {
    /// Service of the instance.
    pub service: String,
    /// Address of the instance (IP:port).
    pub address: String,
    /// Longest wait for every live agent to acknowledge.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// `drain` or `undrain`; fails (exit 1) unless every live agent acknowledged in time.
pub fn drain(to: &Target, args: &DrainArgs, undrain: bool) -> Result<(), RemoteError> {
    runtime()?.block_on(async {
        let mut client = coordinator_client(to).await?;
        let req = pb::DrainRequest {
            key: Some(pb::InstanceKey { service: args.service.clone(), address: args.address.clone() }),
            timeout_ms: args.timeout.as_millis(),
        };
        let resp = if undrain { client.undrain(req).await } else { client.drain(req).await };
        let r = resp.map_err(status_error)?.into_inner();
        let verb = if undrain { "undrain" } else { "drain" };
        if args.output == "json" {
            let nodes: Vec<serde_json::Value> = r
                .nodes
                .iter()
                .map(|n| {
                    serde_json::json!({ "node": n.node, "acked": n.acked, "connected": n.connected, "latency_us": n.latency_us })
                })
                .collect();
            let v = serde_json::json!({ "revision": r.revision, "complete": r.complete, "nodes": nodes });
            println!("{v}");
        } else {
            println!("{verb} {} {}: revision {}", args.service, args.address, r.revision);
            println!("{:<24} {:<10} {:>12}", "NODE", "ACK", "LATENCY");
            for n in &r.nodes {
                let ack = match (n.acked, n.connected) {
                    (true, _) => "yes",
                    (false, true) => "TIMEOUT",
                    (false, false) => "LOST",
                };
                let latency = if n.acked { format!("{:.2}ms", n.latency_us as f64 / 1000.0) } else { "-".into() };
                println!("{:<24} {:<10} {:>12}", n.node, ack, latency);
            }
            if r.nodes.iter().any(|n| !n.connected) {
                println!("LOST: the agent is disconnected; its node keeps steering with its last state and gets the {verb} when it reconnects");
            }
        }
        if r.complete {
            Ok(())
        } else {
            let late: Vec<&str> = r.nodes.iter().filter(|n| n.connected && !n.acked).map(|n| n.node.as_str()).collect();
            Err(RemoteError::Failed(anyhow::anyhow!(
                "{verb} not acknowledged within {} by: {}",
                args.timeout,
                late.join(", ")
            )))
        }
    })
}
