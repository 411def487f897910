//! The durable record of a rollout: what it aims at, how, and how far it got. Written to
//! the store before and after every step, so a coordinator killed at any moment resumes
//! from it (the engine re-observes what runs; every operation is idempotent).

use hitless_model::Architecture;
use hitless_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::strategy::{Amount, GateSpec, Strategy};

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Executing steps.
    Running,
    /// Paused by an operator between steps.
    Paused,
    /// At an approval gate, waiting for `promote`.
    Waiting,
    /// Reached its target.
    Done,
    /// Stopped on an error; traffic stays on healthy instances.
    Failed,
    /// Went back to the previous architecture (abort or a failed gate).
    RolledBack,
}

impl Phase {
    /// Lowercase name for status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Waiting => "waiting",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::RolledBack => "rolled-back",
        }
    }

    /// Whether the engine has work to do.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running)
    }
}

/// The strategy as pushed (kept as given, rebuilt on load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StrategyRecord {
    /// Strategy name.
    pub name: String,
    /// rolling.
    pub max_surge: String,
    /// rolling.
    pub max_unavailable: String,
    /// gray.
    pub first_batch: String,
    /// gray (0: default).
    pub batches: u32,
    /// weighted.
    pub steps: Vec<u32>,
    /// Gates as written (`2:approval`).
    pub gates: Vec<String>,
}

impl From<&pb::StrategySpec> for StrategyRecord {
    fn from(s: &pb::StrategySpec) -> Self {
        Self {
            name: s.name.clone(),
            max_surge: s.max_surge.clone(),
            max_unavailable: s.max_unavailable.clone(),
            first_batch: s.first_batch.clone(),
            batches: s.batches,
            steps: s.steps.clone(),
            gates: s.gates.clone(),
        }
    }
}

impl StrategyRecord {
    /// The strategy and gates, or every problem (each naming its field of the gRPC
    /// `StrategySpec`).
    pub fn build(&self) -> Result<(Strategy, Vec<GateSpec>), Vec<String>> {
        self.build_named(&|field| if field.is_empty() { "strategy".to_owned() } else { format!("strategy.{field}") })
    }

    /// Like [`StrategyRecord::build`], naming each field with `field` (given the
    /// `StrategySpec` field name, or "" for the strategy as a whole): the CLI names its
    /// flags instead.
    pub fn build_named(&self, field: &dyn Fn(&str) -> String) -> Result<(Strategy, Vec<GateSpec>), Vec<String>> {
        let name = self.name.as_str();
        let mut s = Strategy::from_name(name).ok_or_else(|| {
            vec![format!("{}: unknown strategy {name:?}; use one of {}", field("name"), Strategy::NAMES.join(", "))]
        })?;
        let mut problems = Vec::new();
        let misplaced = |f: &str, owner: &str| format!("{} applies to {owner}, not {name}; remove it", field(f));
        let amount = |f: &str, text: &str, owner: &str, slot: Option<&mut Amount>, problems: &mut Vec<String>| {
            if text.is_empty() {
                return;
            }
            match (slot, text.parse::<Amount>()) {
                (Some(slot), Ok(a)) => *slot = a,
                (Some(_), Err(e)) => problems.push(format!("{}: {e}", field(f))),
                (None, _) => problems.push(misplaced(f, owner)),
            }
        };
        let (mut surge, mut unavailable, mut first, mut batches, mut steps) = (None, None, None, None, None);
        match &mut s {
            Strategy::Rolling { max_surge, max_unavailable } => {
                (surge, unavailable) = (Some(max_surge), Some(max_unavailable))
            }
            Strategy::Gray { first_batch, batches: b } => (first, batches) = (Some(first_batch), Some(b)),
            Strategy::Weighted { steps: st } => steps = Some(st),
            _ => {}
        }
        amount("max_surge", &self.max_surge, "rolling", surge, &mut problems);
        amount("max_unavailable", &self.max_unavailable, "rolling", unavailable, &mut problems);
        amount("first_batch", &self.first_batch, "gray", first, &mut problems);
        match (batches, self.batches) {
            (_, 0) => {}
            (Some(b), given) => *b = given,
            (None, _) => problems.push(misplaced("batches", "gray")),
        }
        match (steps, self.steps.is_empty()) {
            (_, true) => {}
            (Some(st), false) => st.clone_from(&self.steps),
            (None, false) => problems.push(misplaced("steps", "weighted")),
        }
        let s = s.validated().map_err(|e| vec![format!("{}: {e}", field(""))]);
        let gates: Vec<GateSpec> = self
            .gates
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                g.parse().map_err(|e| problems.push(format!("{}: {e}", field(&format!("gates[{i}]"))))).ok()
            })
            .collect();
        match s {
            Ok(s) if problems.is_empty() => Ok((s, gates)),
            Ok(_) => Err(problems),
            Err(more) => Err(problems.into_iter().chain(more).collect()),
        }
    }
}

/// A rollout, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Id (the revision of the push that started it).
    pub id: String,
    /// The target architecture file.
    pub target_yaml: String,
    /// How.
    pub strategy: StrategyRecord,
    /// Where it is.
    pub phase: Phase,
    /// Steps completed.
    pub step: u32,
    /// Why it failed or rolled back; what it waits for.
    pub message: String,
    /// The last architecture a rollout completed (where `abort` returns to).
    pub previous_yaml: Option<String>,
    /// Phases with their durations, newest last (bounded).
    pub log: Vec<String>,
}

/// Entries kept in [`Rollout::log`].
pub const LOG_LIMIT: usize = 200;

impl Rollout {
    /// The target, parsed (it was validated when pushed).
    pub fn target(&self) -> Result<Architecture, String> {
        Architecture::parse(&self.target_yaml).map_err(|e| e.to_string())
    }

    /// Appends a log line, keeping the newest [`LOG_LIMIT`].
    pub fn note(&mut self, line: impl Into<String>) {
        self.log.push(line.into());
        if self.log.len() > LOG_LIMIT {
            let extra = self.log.len() - LOG_LIMIT;
            self.log.drain(..extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_problems_name_their_fields() {
        let r = StrategyRecord {
            name: "rolling".into(),
            max_surge: "lots".into(),
            first_batch: "1".into(),
            ..Default::default()
        };
        let p = r.build().unwrap_err().join("\n");
        assert!(p.contains("strategy.max_surge:"), "{p}");
        assert!(p.contains("strategy.first_batch applies to gray, not rolling"), "{p}");
        let r = StrategyRecord { name: "rollin".into(), ..Default::default() };
        assert!(r.build().unwrap_err()[0].starts_with("strategy.name: unknown strategy"));
        let r = StrategyRecord { name: "gray".into(), gates: vec!["x".into()], ..Default::default() };
        assert!(r.build().unwrap_err()[0].starts_with("strategy.gates[0]:"));
        let r = StrategyRecord { name: "canary".into(), batches: 2, steps: vec![50, 100], ..Default::default() };
        let p = r.build().unwrap_err().join("\n");
        assert!(p.contains("strategy.batches applies to gray, not canary"), "{p}");
        assert!(p.contains("strategy.steps applies to weighted, not canary"), "{p}");
        let flags = r.build_named(&|f| format!("--{f}")).unwrap_err().join("\n");
        assert!(flags.contains("--batches applies to gray"), "the CLI names its flags: {flags}");
    }

    #[test]
    fn a_valid_spec_builds() {
        let r = StrategyRecord {
            name: "rolling".into(),
            max_surge: "1".into(),
            max_unavailable: "0".into(),
            ..Default::default()
        };
        let (s, gates) = r.build().unwrap();
        assert_eq!(s.name(), "rolling");
        assert!(gates.is_empty());
    }
}
