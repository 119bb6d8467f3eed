//! Walden: a durable write-ahead-log service.
//!
//! # Layout
//! - [`entry`]: the `Entry` every layer shares, and the three-valued `Durable`.
//! - [`backends`]: queue backends; [`backends::embedded`] is the durable log
//!   on local disk that Walden uses by default.

pub mod backends;
pub mod entry;
