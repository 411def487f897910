//! Strategy parameters as written on the command line: amounts (`2`, `25%`) and gates.

use std::fmt;
use std::str::FromStr;

use hitless_model::Duration;
use serde::Serialize;

/// A bad strategy parameter; the message says what and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}; {fix}")]
pub struct ParamError {
    /// What is wrong.
    pub what: String,
    /// How to fix it.
    pub fix: String,
}

impl ParamError {
    pub(crate) fn new(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { what: what.into(), fix: fix.into() }
    }
}

/// A number of instances, absolute or a percentage of a service's desired count (as in a
/// Kubernetes Deployment's `maxSurge` and `maxUnavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Amount {
    /// This many instances.
    Count(u32),
    /// This percentage of the desired instances.
    Percent(u32),
}

impl Amount {
    /// The amount for `desired` instances, percentages rounded up (a surge).
    pub fn round_up(self, desired: u32) -> u32 {
        match self {
            Self::Count(n) => n,
            Self::Percent(p) => u32::try_from((u64::from(p) * u64::from(desired)).div_ceil(100)).unwrap_or(u32::MAX),
        }
    }

    /// The amount for `desired` instances, percentages rounded down (an unavailability).
    pub fn round_down(self, desired: u32) -> u32 {
        match self {
            Self::Count(n) => n,
            Self::Percent(p) => u32::try_from(u64::from(p) * u64::from(desired) / 100).unwrap_or(u32::MAX),
        }
    }

    /// Whether this is zero whatever the desired count.
    pub fn is_zero(self) -> bool {
        matches!(self, Self::Count(0) | Self::Percent(0))
    }
}

impl FromStr for Amount {
    type Err = ParamError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ParamError::new(format!("{text:?} is not an amount"), "write a count (2) or a percentage (25%)");
        match text.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p) if p <= 100 => Ok(Self::Percent(p)),
                Ok(_) => Err(ParamError::new(format!("{text} is over 100%"), "use a percentage from 0% to 100%")),
                Err(_) => Err(bad()),
            },
            None => text.parse().map(Self::Count).map_err(|_| bad()),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A pause before the rollout goes on past a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Gate {
    /// Wait for an operator's `hitless promote` (or `abort`).
    Approval,
    /// Watch the golden metrics for `window`; go on if the error rate of the new version
    /// stays at or under `max_error_permille` (per thousand), else roll back.
    Analysis {
        /// How long to watch.
        window: Duration,
        /// Highest acceptable share of failed connects, per thousand.
        max_error_permille: u32,
        /// What a window with nothing to judge (no connects, no series) does.
        inconclusive: Inconclusive,
    },
}

/// What an analysis with nothing to judge does: a window without a single connect to
/// the new version proves nothing, so by default it holds the rollout for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Inconclusive {
    /// Wait for `hitless promote` (or `abort`), saying why in status.
    #[default]
    Hold,
    /// Go on, noting it in the log.
    Pass,
    /// Roll back, as a failed analysis does.
    Fail,
}

impl fmt::Display for Inconclusive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hold => "hold",
            Self::Pass => "pass",
            Self::Fail => "fail",
        })
    }
}

impl Gate {
    /// The analysis used when none is spelled out: 2 minutes, at most 1% errors, hold
    /// when there is nothing to judge.
    pub const DEFAULT_ANALYSIS: Self = Self::Analysis {
        window: Duration::from_millis(120_000),
        max_error_permille: 10,
        inconclusive: Inconclusive::Hold,
    };
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Approval => write!(f, "approval"),
            Self::Analysis { window, max_error_permille: m, inconclusive } => {
                write!(f, "analysis {window}, errors ≤ {}.{}%", m / 10, m % 10)?;
                match inconclusive {
                    Inconclusive::Hold => Ok(()),
                    other => write!(f, ", no traffic: {other}"),
                }
            }
        }
    }
}

/// A gate placed on a plan step from the command line: `3` (approval after step 3),
/// `3:approval`, `3:analysis`, `3:analysis=5m,0.5%` or `3:analysis=5m,0.5%,pass` (what
/// a window with nothing to judge does: hold, the default, pass or fail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateSpec {
    /// Plan step (1-based) after which the gate holds.
    pub step: usize,
    /// The gate.
    pub gate: Gate,
}

impl FromStr for GateSpec {
    type Err = ParamError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fix = "write STEP, STEP:approval, STEP:analysis or STEP:analysis=WINDOW,MAX%[,hold|pass|fail] (e.g. 2:analysis=5m,0.5%)";
        let bad = || ParamError::new(format!("{text:?} is not a gate"), fix);
        let (step, kind) = text.split_once(':').unwrap_or((text, "approval"));
        let step: usize = step.parse().map_err(|_| bad())?;
        if step == 0 {
            return Err(ParamError::new("gate step 0 does not exist", "steps are numbered from 1"));
        }
        let gate = match kind.split_once('=') {
            None if kind == "approval" => Gate::Approval,
            None if kind == "analysis" => Gate::DEFAULT_ANALYSIS,
            Some(("analysis", args)) => {
                let mut parts = args.split(',');
                let (Some(window), Some(max)) = (parts.next(), parts.next()) else { return Err(bad()) };
                let inconclusive = match parts.next() {
                    None | Some("hold") => Inconclusive::Hold,
                    Some("pass") => Inconclusive::Pass,
                    Some("fail") => Inconclusive::Fail,
                    Some(_) => return Err(bad()),
                };
                if parts.next().is_some() {
                    return Err(bad());
                }
                let window: Duration = window.parse().map_err(|_| bad())?;
                Gate::Analysis { window, max_error_permille: permille(max).ok_or_else(bad)?, inconclusive }
            }
            _ => return Err(bad()),
        };
        Ok(Self { step, gate })
    }
}

/// `1%` → 10, `0.5%` → 5 (one decimal at most).
fn permille(text: &str) -> Option<u32> {
    let p = text.strip_suffix('%')?;
    let (whole, frac) = p.split_once('.').unwrap_or((p, "0"));
    if frac.len() != 1 {
        return None;
    }
    let v = whole.parse::<u32>().ok()?.checked_mul(10)?.checked_add(frac.parse::<u32>().ok()?)?;
    (v <= 1000).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_round_like_kubernetes() {
        let p: Amount = "25%".parse().unwrap();
        assert_eq!((p.round_up(6), p.round_down(6)), (2, 1));
        assert_eq!((p.round_up(1), p.round_down(1)), (1, 0));
        assert_eq!("3".parse::<Amount>().unwrap().round_up(100), 3);
        for bad in ["", "-1", "101%", "x%", "2.5"] {
            assert!(bad.parse::<Amount>().is_err(), "{bad}");
        }
    }

    #[test]
    fn gates_parse() {
        assert_eq!("2".parse::<GateSpec>().unwrap(), GateSpec { step: 2, gate: Gate::Approval });
        assert_eq!("4:analysis".parse::<GateSpec>().unwrap().gate, Gate::DEFAULT_ANALYSIS);
        assert_eq!(
            "1:analysis=5m,0.5%".parse::<GateSpec>().unwrap().gate,
            Gate::Analysis { window: "5m".parse().unwrap(), max_error_permille: 5, inconclusive: Inconclusive::Hold }
        );
        assert_eq!(
            "1:analysis=5m,0.5%,fail".parse::<GateSpec>().unwrap().gate,
            Gate::Analysis { window: "5m".parse().unwrap(), max_error_permille: 5, inconclusive: Inconclusive::Fail }
        );
        for bad in [
            "0",
            "x",
            "1:maybe",
            "1:analysis=5m",
            "1:analysis=5m,0.55%",
            "1:analysis=5m,1%,maybe",
            "1:analysis=5m,1%,pass,x",
        ] {
            assert!(bad.parse::<GateSpec>().is_err(), "{bad}");
        }
    }
}
