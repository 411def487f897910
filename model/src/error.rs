//! Errors of input files: every problem names its field path, what is wrong and the fix.

use std::fmt;

/// One problem in an input file: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `services[1].depends_on`.
    pub path: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl FieldError {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { path: path.into(), problem: problem.into(), fix: fix.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

/// A value from an input file, quoted for an error message: whole (escaped) when short,
/// else its first characters and its length, so that a 5 MB value is never printed back
/// whole.
pub struct Quoted<'a>(pub &'a str);

/// Longest value quoted whole.
const QUOTE_MAX: usize = 64;
/// Characters shown of a longer one.
const QUOTE_PREFIX: usize = 32;

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= QUOTE_MAX {
            return write!(f, "{:?}", self.0);
        }
        let end = self.0.char_indices().nth(QUOTE_PREFIX).map_or(self.0.len(), |(i, _)| i);
        write!(f, "{:?}… ({} bytes)", &self.0[..end], self.0.len())
    }
}

/// A key from an input file as it appears in a field path: whole when short, else its
/// first characters and `…`.
pub fn short_key(key: &str) -> std::borrow::Cow<'_, str> {
    if key.len() <= QUOTE_MAX {
        return key.into();
    }
    let end = key.char_indices().nth(QUOTE_PREFIX).map_or(key.len(), |(i, _)| i);
    format!("{}…", &key[..end]).into()
}

/// A file that cannot be used. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The text is not YAML at all (a syntax error stops parsing at its first problem).
    #[error("{0}")]
    Syntax(FieldError),
    /// The YAML parsed, but these fields are wrong (every problem found, in file order).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

impl ModelError {
    /// Every problem, one per entry.
    pub fn problems(&self) -> Vec<FieldError> {
        match self {
            Self::Syntax(e) => vec![e.clone()],
            Self::Invalid(v) => v.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_quoted_by_a_prefix_and_their_length() {
        assert_eq!(Quoted("cart").to_string(), "\"cart\"");
        let long = "x".repeat(5_000_000);
        let q = Quoted(&long).to_string();
        assert!(q.len() < 80, "{q}");
        assert!(q.starts_with("\"xxxx") && q.ends_with("… (5000000 bytes)"), "{q}");
        assert_eq!(short_key("node-a"), "node-a");
        assert!(short_key(&long).len() < 40);
        // Never cut inside a character.
        let wide = "é".repeat(100);
        assert!(Quoted(&wide).to_string().contains("(200 bytes)"));
    }
}
