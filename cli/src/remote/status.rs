//! `hitless status`: the registry revision, every node's agent, and the rollout.

use clap::Args;
use hitless_proto::v1::{self as pb};

use super::{coordinator_client, runtime, status_error, RemoteError, Target};

/// `hitless status`.
#[derive(Args)]
pub struct StatusArgs {
    /// Keep showing the status, refreshed, until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// `status`: the registry revision, every node's agent, and the rollout. With
/// `--watch`, redrawn in place every 500 ms (crossterm moves the cursor home and clears
/// what the last frame left below each line), over one connection.
pub fn status(to: &Target, args: &StatusArgs) -> Result<(), RemoteError> {
    let json = args.output == "json";
    runtime()?.block_on(async {
        let mut client = coordinator_client(to).await?;
        if !args.watch {
            let r = client.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner();
            print!("{}", render_status(&r, json));
            return Ok(());
        }
        let mut term = std::io::stdout();
        let _ = crossterm::execute!(term, crossterm::terminal::Clear(crossterm::terminal::ClearType::All));
        loop {
            let r = client.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner();
            draw(&mut term, &render_status(&r, json));
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    })
}

/// One frame in place: from the top-left corner, each line then the rest of it cleared,
/// then everything below the frame cleared (a shorter frame leaves nothing behind).
fn draw(term: &mut std::io::Stdout, frame: &str) {
    use crossterm::terminal::{Clear, ClearType};
    use crossterm::{cursor::MoveTo, queue, style::Print};
    let _ = queue!(term, MoveTo(0, 0));
    for line in frame.lines() {
        let _ = queue!(term, Print(line), Clear(ClearType::UntilNewLine), Print("\r\n"));
    }
    let _ = queue!(term, Clear(ClearType::FromCursorDown));
    let _ = std::io::Write::flush(term);
}

/// The status as a table (or one JSON line).
fn render_status(r: &pb::StatusResponse, json: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if json {
        let nodes: Vec<serde_json::Value> = r
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node": n.node, "connected": n.connected, "applied_revision": n.applied_revision,
                    "lag": n.lag, "last_contact_ms_ago": n.last_contact_ms_ago,
                })
            })
            .collect();
        let rollout = r.rollout.as_ref().map(|ro| {
            let services: Vec<serde_json::Value> = ro
                .services
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "service": s.service, "version": s.version, "desired": s.desired,
                        "new_serving": s.new_serving, "old_serving": s.old_serving,
                        "starting": s.starting, "draining": s.draining,
                    })
                })
                .collect();
            serde_json::json!({
                "id": ro.id, "state": ro.state, "step": ro.step, "steps": ro.steps,
                "strategy": ro.strategy, "waiting_for": ro.waiting_for, "message": ro.message,
                "services": services, "log": ro.log,
            })
        });
        let _ = writeln!(out, "{}", serde_json::json!({ "revision": r.revision, "nodes": nodes, "rollout": rollout }));
    } else {
        let _ = writeln!(out, "registry revision {}", r.revision);
        let _ = writeln!(out, "{:<24} {:<12} {:>10} {:>6} {:>14}", "NODE", "AGENT", "APPLIED", "LAG", "LAST CONTACT");
        for n in &r.nodes {
            let agent = if n.connected { "connected" } else { "LOST" };
            let _ = writeln!(
                out,
                "{:<24} {:<12} {:>10} {:>6} {:>12}ms",
                n.node, agent, n.applied_revision, n.lag, n.last_contact_ms_ago
            );
        }
        if let Some(ro) = &r.rollout {
            let _ = writeln!(out, "\nrollout {} ({}): {}", ro.id, ro.strategy, ro.state);
            let _ = writeln!(out, "step {} of {}", ro.step, ro.steps);
            let _ = writeln!(
                out,
                "{:<16} {:<10} {:>8} {:>8} {:>9} {:>9} {:>8}",
                "SERVICE", "TARGET", "NEW", "OLD", "STARTING", "DRAINING", "DESIRED"
            );
            for s in &ro.services {
                let _ = writeln!(
                    out,
                    "{:<16} {:<10} {:>8} {:>8} {:>9} {:>9} {:>8}",
                    s.service, s.version, s.new_serving, s.old_serving, s.starting, s.draining, s.desired
                );
            }
            if !ro.waiting_for.is_empty() {
                let _ = writeln!(out, "waiting for: {}", ro.waiting_for);
            } else if !ro.message.is_empty() {
                let _ = writeln!(out, "{}", ro.message);
            }
            for l in &ro.log {
                let _ = writeln!(out, "  {l}");
            }
        }
    }
    out
}
