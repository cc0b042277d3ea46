//! Long-form documentation: design, model checking and limitations.
//!
//! Nothing here is code; each module is a chapter.

#[doc = include_str!("implementation.md")]
pub mod implementation {}

#[doc = include_str!("model_checking.md")]
pub mod model_checking {}

#[doc = include_str!("semantics.md")]
pub mod semantics {}
