//! Design notes of the gateway, longer than the modules' own.

pub mod limits;
