//! `hitless push`, `pause`, `resume`, `promote`, `abort`, `pull`, and the strategy
//! flags `plan` shares with `push`.

use std::path::PathBuf;

use clap::Args;
use hitless_coordinator::engine::record::StrategyRecord;
use hitless_coordinator::{GateSpec, Strategy};
use hitless_proto::v1::{self as pb};

use super::{coordinator_client, runtime, status_error, RemoteError, Target};

/// The strategy flags of `plan` and `push`, as the gRPC `StrategySpec` carries them:
/// one builder ([`StrategyRecord::build_named`]) checks them for both.
#[derive(Args)]
pub struct StrategyArgs {
    /// Update strategy: straight, canary, blue-green, mixed, rolling, gray, weighted.
    #[arg(long, value_name = "S")]
    pub strategy: String,
    /// rolling: instances allowed over the desired count, N or P% [default: 25%].
    #[arg(long, value_name = "N|P%", default_value = "")]
    pub max_surge: String,
    /// rolling: serving instances allowed under the desired count, N or P% [default: 25%].
    #[arg(long, value_name = "N|P%", default_value = "")]
    pub max_unavailable: String,
    /// gray: size of the first batch, before its approval gate [default: 1].
    #[arg(long, value_name = "N|P%", default_value = "")]
    pub first_batch: String,
    /// gray: batches after the first [default: 3].
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub batches: u32,
    /// weighted: traffic shares of the new version, in percent [default: 5,25,50,100].
    #[arg(long, value_name = "P,P,...", value_delimiter = ',')]
    pub steps: Vec<u32>,
    /// Pause after a step: STEP (approval), STEP:approval, STEP:analysis or
    /// STEP:analysis=WINDOW,MAX%[,hold|pass|fail] (e.g. 2:analysis=5m,0.5%; the last part
    /// says what a window with nothing to judge does, hold by default). Repeatable.
    #[arg(long = "gate", value_name = "SPEC")]
    pub gates: Vec<String>,
}

impl StrategyArgs {
    /// The flags as the gRPC request carries them.
    pub fn spec(&self) -> pb::StrategySpec {
        pb::StrategySpec {
            name: self.strategy.clone(),
            max_surge: self.max_surge.clone(),
            max_unavailable: self.max_unavailable.clone(),
            first_batch: self.first_batch.clone(),
            batches: self.batches,
            steps: self.steps.clone(),
            gates: self.gates.clone(),
        }
    }

    /// The strategy and gates, or every problem, each naming its flag.
    pub fn build(&self) -> Result<(Strategy, Vec<GateSpec>), Vec<String>> {
        StrategyRecord::from(&self.spec()).build_named(&|field| match field {
            "" | "name" => "--strategy".to_owned(),
            f if f.starts_with("gates[") => {
                format!("--gate #{}", f[6..f.len() - 1].parse::<usize>().map_or(0, |i| i + 1))
            }
            f => format!("--{}", f.replace('_', "-")),
        })
    }
}

/// `hitless push`.
#[derive(Args)]
pub struct PushArgs {
    /// Architecture file to reach.
    #[arg(long, value_name = "FILE")]
    pub target: PathBuf,
    /// The strategy and its parameters.
    #[command(flatten)]
    pub strategy: StrategyArgs,
    /// Follow the rollout until it ends: exit 0 when it reaches the target, 1 when it
    /// fails or rolls back.
    #[arg(long)]
    pub wait: bool,
}

/// `push`: starts (or retargets) a rollout; with `--wait`, follows it to its end.
pub fn push(to: &Target, args: &PushArgs) -> Result<(), RemoteError> {
    let text = std::fs::read_to_string(&args.target)
        .map_err(|e| RemoteError::BadInput(format!("--target {}: cannot read the file: {e}", args.target.display())))?;
    if let Err(e) = hitless_model::Architecture::parse(&text) {
        let lines: Vec<String> = e.problems().iter().map(|p| format!("{}: {p}", args.target.display())).collect();
        return Err(RemoteError::BadInput(lines.join("\n")));
    }
    if let Err(p) = args.strategy.build() {
        return Err(RemoteError::BadInput(p.join("\n")));
    }
    let spec = args.strategy.spec();
    runtime()?.block_on(async {
        let mut client = coordinator_client(to).await?;
        let r = client
            .push(pb::PushRequest { architecture_yaml: text, strategy: Some(spec) })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("rollout {}: {} steps planned", r.rollout_id, r.steps);
        if !args.wait {
            return Ok(());
        }
        let mut shown = String::new();
        loop {
            let s = client.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner();
            let Some(ro) = s.rollout else { return Err(RemoteError::Failed(anyhow::anyhow!("the rollout vanished"))) };
            let line = progress_line(&ro);
            if line != shown {
                println!("{line}");
                shown = line;
            }
            match ro.state.as_str() {
                "done" => return Ok(()),
                "failed" | "rolled-back" => {
                    return Err(RemoteError::Failed(anyhow::anyhow!("rollout {} {}: {}", ro.id, ro.state, ro.message)))
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    })
}

fn progress_line(r: &pb::RolloutStatus) -> String {
    let services: Vec<String> = r
        .services
        .iter()
        .map(|s| {
            format!(
                "{} {}: {}/{} new serving, {} old, {} starting, {} draining",
                s.service, s.version, s.new_serving, s.desired, s.old_serving, s.starting, s.draining
            )
        })
        .collect();
    let mut line = format!("[{}] step {}/{} {} — {}", r.state, r.step, r.steps, r.strategy, services.join("; "));
    if !r.waiting_for.is_empty() {
        line += &format!(" — waiting for {}", r.waiting_for);
    }
    line
}

/// `pull`: prints the running architecture as an architecture file.
pub fn pull(to: &Target) -> Result<(), RemoteError> {
    runtime()?.block_on(async {
        let mut client = coordinator_client(to).await?;
        let r = client
            .pull(pb::PullRequest {})
            .await
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition => RemoteError::Failed(anyhow::anyhow!("pull: {}", s.message())),
                _ => status_error(s),
            })?
            .into_inner();
        print!("{}", r.architecture_yaml);
        Ok(())
    })
}

/// `pause`, `resume`, `promote`, `abort`.
pub fn control(to: &Target, what: &str) -> Result<(), RemoteError> {
    runtime()?.block_on(async {
        let mut client = coordinator_client(to).await?;
        let req = pb::RolloutRequest {};
        let r = match what {
            "pause" => client.pause(req).await,
            "resume" => client.resume(req).await,
            "promote" => client.promote(req).await,
            _ => client.abort(req).await,
        }
        .map_err(|s| match s.code() {
            tonic::Code::FailedPrecondition => RemoteError::Failed(anyhow::anyhow!("{what}: {}", s.message())),
            _ => status_error(s),
        })?
        .into_inner();
        if let Some(ro) = r.rollout {
            println!("{}", progress_line(&ro));
        }
        Ok(())
    })
}
