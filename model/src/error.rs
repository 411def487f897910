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
