//! Durations as written in files: `250ms`, `30s`, `2m`, `1h`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A span of time with millisecond resolution, written `250ms`, `30s`, `2m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration {
    millis: u64,
}

/// A duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration")]
pub struct DurationError {
    /// The text that was given.
    pub text: String,
}

impl Duration {
    /// Hint for error messages.
    pub const FORMAT_HINT: &'static str = "write a whole number with a unit: 250ms, 30s, 2m or 1h";

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self { millis }
    }

    /// Whole milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    /// The same span as a standard library duration.
    pub const fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || DurationError { text: text.to_owned() };
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (digits, unit) = text.split_at(split);
        if digits.is_empty() {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let scale = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        n.checked_mul(scale).map(Self::from_millis).ok_or_else(bad)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.millis;
        if m != 0 && m.is_multiple_of(3_600_000) {
            write!(f, "{}h", m / 3_600_000)
        } else if m != 0 && m.is_multiple_of(60_000) {
            write!(f, "{}m", m / 60_000)
        } else if m.is_multiple_of(1_000) {
            write!(f, "{}s", m / 1_000)
        } else {
            write!(f, "{m}ms")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_units() {
        for (text, millis) in [("250ms", 250), ("30s", 30_000), ("2m", 120_000), ("1h", 3_600_000), ("0s", 0)] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.as_millis(), millis, "{text}");
            assert_eq!(d.to_string(), text);
        }
        assert_eq!(Duration::from_millis(90_000).to_string(), "90s");
    }

    #[test]
    fn rejects_malformed() {
        for text in ["", "30", "s", "-1s", "1.5s", "3 s", "30sec", "99999999999999999999h"] {
            assert!(text.parse::<Duration>().is_err(), "{text:?} should not parse");
        }
    }
}
