//! The two managers, and what they report in common.
//!
//! Both store a [`State`] and a [`Limit`] per agent and leave every
//! decision to [`crate::rules`]; they differ only in storage: lock-free
//! cells in a concurrent map, or the seed's two locked maps.

pub(crate) mod locked;
pub(crate) mod lockfree;

use crate::limit::Limit;
use crate::rules::{Now, Policy, Reading, State};
use crate::types::{AgentId, BudgetInfo, FullBudgetInfo};

const MILLIS_PER_SEC: u64 = 1_000;

/// Where a manager announces the events that can let a waiting request in.
/// Without the `async` feature nobody waits, and every call is a no-op.
#[derive(Default)]
pub(crate) struct Events {
    #[cfg(feature = "async")]
    waiters: crate::wait::Waiters,
}

impl Events {
    /// Budget came back to `agent_id` (a refund, a release, a new window).
    /// `headroom` is read only if someone waits on that agent.
    #[inline]
    pub(crate) fn refunded(
        &self,
        agent_id: &AgentId,
        headroom: impl FnOnce() -> Option<(u64, u64)>,
    ) {
        #[cfg(feature = "async")]
        self.waiters
            .wake(agent_id, || crate::wait::Wake::Fitting(headroom()));
        #[cfg(not(feature = "async"))]
        let _ = (agent_id, headroom);
    }

    /// The agent's limit was set or removed: every waiter must look again.
    pub(crate) fn limit_changed(&self, agent_id: &AgentId) {
        #[cfg(feature = "async")]
        self.waiters.wake(agent_id, || crate::wait::Wake::All);
        #[cfg(not(feature = "async"))]
        let _ = agent_id;
    }

    /// Every agent was replaced (`restore`).
    pub(crate) fn everything_changed(&self) {
        #[cfg(feature = "async")]
        self.waiters.wake_everyone();
    }

    #[cfg(feature = "async")]
    pub(crate) fn waiters(&self) -> &crate::wait::Waiters {
        &self.waiters
    }
}

/// What an agent without a budget reads as.
pub(crate) fn unknown_agent_info() -> BudgetInfo {
    BudgetInfo {
        tokens_remaining: 0,
        calls_remaining: 0,
        window_remaining_secs: 0,
        is_exhausted: true,
    }
}

/// `remaining` for a known agent. Reads the state as the next operation
/// would find it, so reads and writes share one expiry rule.
pub(crate) fn budget_info(policy: &Policy, stored: State, now: Now) -> BudgetInfo {
    info_of_reading(&stored.read(policy, now))
}

/// [`budget_info`] of a reading at hand.
fn info_of_reading(reading: &Reading) -> BudgetInfo {
    let (tokens_remaining, calls_remaining) = reading.remaining;
    BudgetInfo {
        tokens_remaining,
        calls_remaining,
        window_remaining_secs: reading.millis_to_reset / MILLIS_PER_SEC,
        is_exhausted: tokens_remaining == 0 || calls_remaining == 0,
    }
}

/// `full_info` for a known agent: [`budget_info`] with the configured
/// limits and the usage beside it.
pub(crate) fn full_budget_info(limit: &Limit, stored: State, now: Now) -> FullBudgetInfo {
    let reading = stored.read(&limit.policy, now);
    let info = info_of_reading(&reading);
    let (tokens_used, calls_used) = reading.used;
    FullBudgetInfo {
        agent_id: limit.configured.agent_id(),
        token_limit: limit.configured.token_budget(),
        tokens_used,
        tokens_remaining: info.tokens_remaining,
        calls_limit: limit.configured.calls_budget(),
        calls_used,
        calls_remaining: info.calls_remaining,
        window_secs: limit
            .configured
            .period_secs()
            .unwrap_or_else(|| stored.window_millis(&limit.policy, now) / MILLIS_PER_SEC),
        window_remaining_secs: info.window_remaining_secs,
        is_exhausted: info.is_exhausted,
    }
}

/// Implements [`crate::BudgetLimiter`] by forwarding to the inherent
/// methods, which carry the documentation callers of the seed will read.
macro_rules! forward_budget_limiter {
    ($manager:ty) => {
        impl $crate::BudgetLimiter for $manager {
            fn with_clock(clock: $crate::ClockSource) -> Self {
                <$manager>::with_clock(clock)
            }
            #[cfg(not(agent_budget_loom))]
            fn with_coarse_clock(
                clock: $crate::ClockSource,
                interval: std::time::Duration,
            ) -> std::io::Result<Self> {
                <$manager>::with_coarse_clock(clock, interval)
            }
            fn set_budget(&self, limit: $crate::BudgetLimit) {
                <$manager>::set_budget(self, limit)
            }
            fn with_clock_at(
                clock: $crate::ClockSource,
                utc_origin: chrono::DateTime<chrono::Utc>,
            ) -> Self {
                <$manager>::with_clock_at(clock, utc_origin)
            }
            fn set_calendar(&self, limit: $crate::CalendarLimit) {
                <$manager>::set_calendar(self, limit)
            }
            fn set_refill(&self, limit: $crate::RefillLimit) {
                <$manager>::set_refill(self, limit)
            }
            fn set_parent(
                &self,
                child: &$crate::AgentId,
                parent: Option<&$crate::AgentId>,
            ) -> Result<(), $crate::HierarchyError> {
                <$manager>::set_parent(self, child, parent)
            }
            fn remove_budget(&self, agent_id: &$crate::AgentId) {
                <$manager>::remove_budget(self, agent_id)
            }
            fn acquire(
                &self,
                agent_id: &$crate::AgentId,
                tokens: u64,
                calls: u64,
            ) -> Result<$crate::Reservation<'_>, $crate::Refused> {
                <$manager>::acquire(self, agent_id, tokens, calls)
            }
            fn acquire_owned(
                self: &std::sync::Arc<Self>,
                agent_id: &$crate::AgentId,
                tokens: u64,
                calls: u64,
            ) -> Result<$crate::OwnedReservation, $crate::Refused> {
                <$manager>::acquire_owned(self, agent_id, tokens, calls)
            }
            fn acquire_owned_reporting(
                self: &std::sync::Arc<Self>,
                agent_id: &$crate::AgentId,
                tokens: u64,
                calls: u64,
                report: impl FnMut($crate::FullBudgetInfo),
            ) -> Result<$crate::OwnedReservation, $crate::Refused> {
                <$manager>::acquire_owned_reporting(self, agent_id, tokens, calls, report)
            }
            #[cfg(feature = "async")]
            fn acquire_wait(
                &self,
                agent_id: &$crate::AgentId,
                tokens: u64,
                calls: u64,
            ) -> impl std::future::Future<
                Output = Result<$crate::Reservation<'_>, $crate::Refused>,
            > + Send
                   + '_ {
                <$manager>::acquire_wait(self, agent_id, tokens, calls)
            }
            #[cfg(feature = "async")]
            fn acquire_owned_wait(
                self: &std::sync::Arc<Self>,
                agent_id: &$crate::AgentId,
                tokens: u64,
                calls: u64,
            ) -> impl std::future::Future<
                Output = Result<$crate::OwnedReservation, $crate::Refused>,
            > + Send
                   + 'static {
                <$manager>::acquire_owned_wait(self, agent_id, tokens, calls)
            }
            fn acquire_set(
                &self,
                claims: &[$crate::Claim],
            ) -> Result<$crate::SetReservation<'_>, $crate::Refused> {
                <$manager>::acquire_set(self, claims)
            }
            fn acquire_set_owned(
                self: &std::sync::Arc<Self>,
                claims: &[$crate::Claim],
            ) -> Result<$crate::OwnedSetReservation, $crate::Refused> {
                <$manager>::acquire_set_owned(self, claims)
            }
            fn acquire_set_shadowed(
                &self,
                claims: &[$crate::Claim],
                shadowed: impl Fn(&$crate::AgentId) -> bool,
            ) -> Result<$crate::SetReservation<'_>, $crate::Refused> {
                <$manager>::acquire_set_shadowed(self, claims, shadowed)
            }
            fn acquire_set_owned_shadowed(
                self: &std::sync::Arc<Self>,
                claims: &[$crate::Claim],
                shadowed: impl Fn(&$crate::AgentId) -> bool,
            ) -> Result<$crate::OwnedSetReservation, $crate::Refused> {
                <$manager>::acquire_set_owned_shadowed(self, claims, shadowed)
            }
            #[cfg(feature = "async")]
            fn acquire_set_owned_wait(
                self: &std::sync::Arc<Self>,
                claims: Vec<$crate::Claim>,
            ) -> impl std::future::Future<
                Output = Result<$crate::OwnedSetReservation, $crate::Refused>,
            > + Send
                   + 'static {
                <$manager>::acquire_set_owned_wait(self, claims)
            }
            #[cfg(feature = "async")]
            fn waiting(&self) -> usize {
                <$manager>::waiting(self)
            }
            fn reserve(
                &self,
                agent_id: &$crate::AgentId,
                tokens: u64,
            ) -> Result<(), $crate::BudgetExceeded> {
                <$manager>::reserve(self, agent_id, tokens)
            }
            fn release(&self, agent_id: &$crate::AgentId, tokens: u64) {
                <$manager>::release(self, agent_id, tokens)
            }
            fn track_call(&self, agent_id: &$crate::AgentId) -> Result<(), $crate::BudgetExceeded> {
                <$manager>::track_call(self, agent_id)
            }
            fn remaining(&self, agent_id: &$crate::AgentId) -> $crate::BudgetInfo {
                <$manager>::remaining(self, agent_id)
            }
            fn can_schedule(&self, agent_id: &$crate::AgentId) -> bool {
                <$manager>::can_schedule(self, agent_id)
            }
            fn check(
                &self,
                agent_id: &$crate::AgentId,
                tokens: u64,
                calls: u64,
            ) -> Result<(), $crate::Refused> {
                <$manager>::check(self, agent_id, tokens, calls)
            }
            fn check_set(&self, claims: &[$crate::Claim]) -> Result<(), $crate::Refused> {
                <$manager>::check_set(self, claims)
            }
            fn reset_window(&self, agent_id: &$crate::AgentId) {
                <$manager>::reset_window(self, agent_id)
            }
            fn full_info(&self, agent_id: &$crate::AgentId) -> Option<$crate::FullBudgetInfo> {
                <$manager>::full_info(self, agent_id)
            }
            fn chain_info(&self, agent_id: &$crate::AgentId) -> Vec<$crate::FullBudgetInfo> {
                <$manager>::chain_info(self, agent_id)
            }
            fn all_full_info(&self) -> Vec<$crate::FullBudgetInfo> {
                <$manager>::all_full_info(self)
            }
            fn persist(&self, path: &std::path::Path) -> Result<(), $crate::PersistError> {
                <$manager>::persist(self, path)
            }
            fn restore(&self, path: &std::path::Path) -> Result<(), $crate::PersistError> {
                <$manager>::restore(self, path)
            }
        }
    };
}
pub(crate) use forward_budget_limiter;
