//! The architecture model of hitless.
