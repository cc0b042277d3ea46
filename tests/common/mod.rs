//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test crate uses its own subset

use std::sync::Arc;
use std::time::Duration;

use agent_budget::{AgentId, BudgetLimit, BudgetLimiter};

/// A budget for `agent_id`.
pub fn limit(agent_id: AgentId, tokens: u64, calls: u64, window_secs: u64) -> BudgetLimit {
    BudgetLimit {
        agent_id,
        token_budget: tokens,
        calls_budget: calls,
        window_secs,
    }
}

/// A fresh random agent id.
pub fn agent() -> AgentId {
    uuid::Uuid::new_v4()
}

/// A manager on a mock clock, and the handle that moves that clock.
pub fn mocked<M: BudgetLimiter>() -> (M, MockTime) {
    let (clock, mock) = quanta::Clock::mock();
    (M::with_clock(clock), MockTime(mock))
}

/// Moves a mock clock forward.
#[derive(Clone)]
pub struct MockTime(pub Arc<quanta::Mock>);

impl MockTime {
    pub fn advance(&self, by: Duration) {
        self.0.increment(by);
    }

    pub fn advance_secs(&self, secs: u64) {
        self.advance(Duration::from_secs(secs));
    }
}

/// Runs a test body once for each manager.
#[macro_export]
macro_rules! for_both_managers {
    ($(#[$meta:meta])* fn $name:ident<$m:ident>() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run<$m: agent_budget::BudgetLimiter>() $body

            $(#[$meta])*
            #[test]
            fn lock_free() {
                run::<agent_budget::BudgetManager>();
            }

            $(#[$meta])*
            #[test]
            fn locked() {
                run::<agent_budget::LockedBudgetManager>();
            }
        }
    };
}

/// Runs an async test body once for each manager, on a current-thread
/// tokio runtime whose clock starts paused: timers fire only when the test
/// advances tokio's clock (or when every task is idle).
#[macro_export]
macro_rules! for_both_managers_async {
    ($(#[$meta:meta])* async fn $name:ident<$m:ident>() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run<$m: agent_budget::BudgetLimiter + 'static>() $body

            $(#[$meta])*
            #[tokio::test(start_paused = true)]
            async fn lock_free() {
                run::<agent_budget::BudgetManager>().await;
            }

            $(#[$meta])*
            #[tokio::test(start_paused = true)]
            async fn locked() {
                run::<agent_budget::LockedBudgetManager>().await;
            }
        }
    };
}
