//! # Sets of limits, spend and per-model limits
//!
//! (Written below.)
