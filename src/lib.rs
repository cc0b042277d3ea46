//! Token and call budgets per agent, enforced without locks.
//!
//! DOCS-PLACEHOLDER
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cell;
mod clock;
mod error;
mod limiter;
mod manager;
mod persist;
mod reservation;
mod sync;
mod types;
mod window;

pub use error::{BudgetExceeded, PersistError};
pub use limiter::BudgetLimiter;
pub use manager::locked::LockedBudgetManager;
pub use manager::lockfree::BudgetManager;
pub use reservation::{Reservation, Settlement};
pub use sync::ClockSource;
pub use types::{AgentId, BudgetInfo, BudgetKind, BudgetLimit, FullBudgetInfo, Usage};
pub use window::{MAX_CALLS, MAX_TOKENS};
