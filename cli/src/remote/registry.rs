//! `hitless registry apply|list|register|deregister`.

use std::path::PathBuf;

use clap::Subcommand;
use hitless_coordinator::server::{MAX_REGISTRY_TEXT, MAX_REGISTRY_YAML};
use hitless_model::Duration;
use hitless_proto::v1::{self as pb};

use super::{registry_client, runtime, status_error, RemoteError, Target};

/// `hitless registry ...`.
#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Replace the registry with a registry file (the static-mode format).
    Apply {
        /// The registry file.
        file: PathBuf,
    },
    /// Print services and instances.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Register an instance (its service is created when new).
    Register {
        /// Service.
        service: String,
        /// Instance address (IP:port).
        address: String,
        /// Version label.
        #[arg(long, default_value = "")]
        version: String,
        /// Relative weight.
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// Lease: the instance goes down when no heartbeat renews it within this time.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<Duration>,
    },
    /// Remove an instance.
    Deregister {
        /// Service.
        service: String,
        /// Instance address.
        address: String,
    },
}

/// The size of one part of a registry sent with `ApplyStream`.
const APPLY_PART: usize = 1 << 20;

/// `registry apply|list|register|deregister`.
pub fn registry(to: &Target, cmd: &RegistryCommand) -> Result<(), RemoteError> {
    // Read and check the file before dialling: bad input is exit 2 even with no coordinator.
    let yaml = match cmd {
        RegistryCommand::Apply { file } => {
            let unreadable =
                |e: std::io::Error| RemoteError::BadInput(format!("{}: cannot read the file: {e}", file.display()));
            let size = std::fs::metadata(file).map_err(unreadable)?.len() as usize;
            if size > MAX_REGISTRY_TEXT {
                return Err(RemoteError::BadInput(format!(
                    "{}: {size} bytes is more than the {} MiB a registry may have (about 150,000 instances); nothing was sent. Split the fleet's services over several coordinators, or drop instances hitless does not steer",
                    file.display(),
                    MAX_REGISTRY_TEXT >> 20
                )));
            }
            let text = std::fs::read_to_string(file).map_err(unreadable)?;
            // A file that fits one request is checked here (its errors need no coordinator);
            // a larger one is checked by the coordinator, which parses it anyway: parsing
            // takes about 35 times a file's size in memory.
            if size <= MAX_REGISTRY_YAML {
                if let Err(e) = hitless_model::registry::Registry::parse(&text) {
                    let lines: Vec<String> = e.problems().iter().map(|p| format!("{}: {p}", file.display())).collect();
                    return Err(RemoteError::BadInput(lines.join("\n")));
                }
            }
            Some(text)
        }
        _ => None,
    };
    runtime()?.block_on(async {
        let mut client = registry_client(to).await?;
        match cmd {
            RegistryCommand::Apply { .. } => {
                let registry_yaml = yaml.unwrap_or_default();
                let r = if registry_yaml.len() <= MAX_REGISTRY_YAML {
                    client.apply(pb::ApplyRequest { registry_yaml }).await
                } else {
                    // In parts: one message could not carry it.
                    let parts: Vec<pb::ApplyChunk> = registry_yaml
                        .as_bytes()
                        .chunks(APPLY_PART)
                        .map(|p| pb::ApplyChunk { registry_yaml_part: p.to_vec() })
                        .collect();
                    client.apply_stream(tokio_stream::iter(parts)).await
                }
                .map_err(status_error)?
                .into_inner();
                println!("applied: registry revision {}", r.revision);
            }
            RegistryCommand::List { output } => {
                let s = client.list(pb::ListRequest {}).await.map_err(status_error)?.into_inner();
                print_list(&s, output == "json");
            }
            RegistryCommand::Register { service, address, version, weight, ttl } => {
                let instance = pb::Instance {
                    service: service.clone(),
                    address: address.clone(),
                    state: pb::InstanceState::Serving as i32,
                    weight: *weight,
                    version: version.clone(),
                    node: String::new(),
                    ttl_ms: ttl.map_or(0, Duration::as_millis),
                };
                let r = client
                    .register(pb::RegisterRequest { instance: Some(instance) })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                println!("registered {service} {address}: registry revision {}", r.revision);
            }
            RegistryCommand::Deregister { service, address } => {
                let key = pb::InstanceKey { service: service.clone(), address: address.clone() };
                let r = client
                    .deregister(pb::DeregisterRequest { key: Some(key) })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                println!("deregistered {service} {address}: registry revision {}", r.revision);
            }
        }
        Ok(())
    })
}

fn state_name(s: pb::InstanceState) -> &'static str {
    match s {
        pb::InstanceState::Serving => "serving",
        pb::InstanceState::Draining => "draining",
        pb::InstanceState::Down => "down",
    }
}

/// A service's protocol as registry files spell it.
fn protocol_name(p: pb::Protocol) -> &'static str {
    match p {
        pb::Protocol::Tcp => "tcp",
        pb::Protocol::Udp => "udp",
    }
}

/// A service's direct-connect policy as registry files spell it.
fn policy_name(p: pb::Policy) -> &'static str {
    match p {
        pb::Policy::Steer => "steer",
        pb::Policy::Reject => "reject",
        pb::Policy::Allow => "allow",
    }
}

fn print_list(s: &pb::Snapshot, json: bool) {
    if json {
        let services: Vec<serde_json::Value> = s
            .services
            .iter()
            .map(|svc| {
                let instances: Vec<serde_json::Value> = s
                    .instances
                    .iter()
                    .filter(|i| i.service == svc.name)
                    .map(|i| {
                        serde_json::json!({
                            "address": i.address, "state": state_name(i.state()), "weight": i.weight,
                            "version": i.version, "node": i.node, "ttl_ms": i.ttl_ms,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": svc.name, "vips": svc.vips, "protocol": protocol_name(svc.protocol()),
                    "policy": policy_name(svc.policy()), "instances": instances,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "revision": s.revision, "services": services }));
        return;
    }
    println!("registry revision {}", s.revision);
    println!("{:<16} {:<24} {:<10} {:>7} {:<10} {:<12}", "SERVICE", "ADDRESS", "STATE", "WEIGHT", "VERSION", "NODE");
    for svc in &s.services {
        let vips = if svc.vips.is_empty() { "none".to_owned() } else { svc.vips.join(", ") };
        println!(
            "{:<16} VIPs {vips}; {}, policy {}",
            svc.name,
            protocol_name(svc.protocol()),
            policy_name(svc.policy())
        );
        for i in s.instances.iter().filter(|i| i.service == svc.name) {
            println!(
                "{:<16} {:<24} {:<10} {:>7} {:<10} {:<12}",
                svc.name,
                i.address,
                state_name(i.state()),
                i.weight,
                i.version,
                i.node
            );
        }
    }
}
