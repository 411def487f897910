//! A walker over parsed YAML that collects every problem with its field path, so a file
//! reports all its errors at once (serde's derive stops at the first).

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use crate::duration::Duration;
use crate::error::FieldError;

/// Collects problems while typed values are pulled out of a YAML tree.
#[derive(Default)]
pub(crate) struct Decoder {
    pub errors: Vec<FieldError>,
}

/// Joins a parent path and a field name.
pub(crate) fn field(path: &str, name: &str) -> String {
    // A key is the file's text: a huge one is shortened (see `short_key`).
    let name = crate::error::short_key(name);
    if path.is_empty() {
        name.into_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// The YAML type name of a value, for "expected X, found Y" messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

impl Decoder {
    /// Records a problem.
    pub fn push(&mut self, path: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) {
        self.errors.push(FieldError::new(path, problem, fix));
    }

    fn wrong_type(&mut self, path: &str, expected: &str, v: &Value, example: &str) {
        self.push(path, format!("expected {expected}, found {}", kind(v)), format!("write it as {example}"));
    }

    /// A mapping whose keys must all be in `known`; unknown keys are reported with the
    /// closest known name.
    pub fn mapping<'a>(&mut self, path: &str, v: &'a Value, known: &[&str], example: &str) -> Option<&'a Mapping> {
        let Value::Mapping(m) = v else {
            self.wrong_type(path, "a mapping", v, example);
            return None;
        };
        for key in m.keys() {
            match key {
                Value::String(k) if known.contains(&k.as_str()) => {}
                Value::String(k) => {
                    let fix = match did_you_mean(k, known) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!("remove it; known fields are {}", known.join(", ")),
                    };
                    self.push(field(path, k), format!("unknown field `{}`", crate::error::short_key(k)), fix);
                }
                other => {
                    self.push(path, format!("a key is {}", kind(other)), "use field names (strings) as keys");
                }
            }
        }
        Some(m)
    }

    /// A required field of a mapping; reports it missing.
    pub fn required<'a>(&mut self, path: &str, m: &'a Mapping, name: &str, example: &str) -> Option<&'a Value> {
        match m.get(name) {
            Some(Value::Null) | None => {
                self.push(field(path, name), "is missing", format!("add `{name}: {example}`"));
                None
            }
            Some(v) => Some(v),
        }
    }

    /// A string.
    pub fn string(&mut self, path: &str, v: &Value, example: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.wrong_type(path, "a string", v, example);
                None
            }
        }
    }

    /// A string, a number or a boolean, kept as text (config and env values, where YAML
    /// turns `128` or `true` into non-strings behind the writer's back).
    pub fn scalar_text(&mut self, path: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.wrong_type(path, "a string", v, "\"text\"");
                None
            }
        }
    }

    /// A whole number from 0 to `max`.
    pub fn count(&mut self, path: &str, v: &Value, max: u64, what: &str) -> Option<u64> {
        match v {
            Value::Number(n) if n.as_u64().is_some_and(|n| n <= max) => n.as_u64(),
            Value::Number(n) if n.as_i64().is_some_and(|n| n < 0) => {
                self.push(path, format!("{what} {n} is negative"), format!("use a whole number from 0 to {max}"));
                None
            }
            Value::Number(n) => {
                self.push(path, format!("{what} {n} is out of range"), format!("use a whole number from 0 to {max}"));
                None
            }
            _ => {
                self.wrong_type(path, "a whole number", v, "2");
                None
            }
        }
    }

    /// A list.
    pub fn seq<'a>(&mut self, path: &str, v: &'a Value, example: &str) -> Option<&'a [Value]> {
        match v {
            Value::Sequence(s) => Some(s),
            _ => {
                self.wrong_type(path, "a list", v, example);
                None
            }
        }
    }

    /// A list of strings.
    pub fn strings(&mut self, path: &str, v: &Value, example: &str) -> Option<Vec<String>> {
        let items = self.seq(path, v, example)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.string(&format!("{path}[{i}]"), item, "\"text\"") {
                Some(s) => out.push(s),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A mapping of names to text values.
    pub fn text_map(&mut self, path: &str, v: &Value, example: &str) -> Option<BTreeMap<String, String>> {
        let Value::Mapping(m) = v else {
            self.wrong_type(path, "a mapping", v, example);
            return None;
        };
        let mut out = BTreeMap::new();
        for (k, val) in m {
            let Value::String(k) = k else {
                self.push(path, format!("a key is {}", kind(k)), "use names (strings) as keys");
                continue;
            };
            if let Some(text) = self.scalar_text(&field(path, k), val) {
                out.insert(k.clone(), text);
            }
        }
        Some(out)
    }

    /// A duration such as `30s`.
    pub fn duration(&mut self, path: &str, v: &Value) -> Option<Duration> {
        let text = self.string(path, v, "30s")?;
        match text.parse() {
            Ok(d) => Some(d),
            Err(e) => {
                self.push(path, e.to_string(), Duration::FORMAT_HINT);
                None
            }
        }
    }
}

/// The known name closest to `given`, if it is close enough to be a typo.
pub(crate) fn did_you_mean<'a>(given: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (given.chars().count() / 3).max(2);
    known
        .iter()
        .map(|k| (edit_distance(&given.to_lowercase(), k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance between two strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let known = ["placement", "depends_on", "version"];
        assert_eq!(did_you_mean("placment", &known), Some("placement"));
        assert_eq!(did_you_mean("depends-on", &known), Some("depends_on"));
        assert_eq!(did_you_mean("Version", &known), Some("version"));
        assert_eq!(did_you_mean("colour", &known), None);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
