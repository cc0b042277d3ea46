//! Long-form documentation.

#[doc = include_str!("fleet.md")]
pub mod fleet {}
