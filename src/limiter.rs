//! The one interface both managers implement.

use std::path::Path;
use std::sync::Arc;

use crate::error::{BudgetExceeded, HierarchyError, PersistError, Refused};
use crate::reservation::{OwnedReservation, OwnedSetReservation, Reservation, SetReservation};
use crate::sync::ClockSource;
use crate::types::{
    AgentId, BudgetInfo, BudgetLimit, CalendarLimit, Claim, FullBudgetInfo, RefillLimit,
};

/// The budget manager's API, implemented by [`BudgetManager`] and
/// [`LockedBudgetManager`], so tests and benchmarks can be written once for
/// both. The methods are documented on [`BudgetManager`].
///
/// [`BudgetManager`]: crate::BudgetManager
/// [`LockedBudgetManager`]: crate::LockedBudgetManager
pub trait BudgetLimiter: Send + Sync {
    /// An empty manager on `clock`.
    fn with_clock(clock: ClockSource) -> Self
    where
        Self: Sized;
    /// An empty manager on a coarse clock (quanta's recent time).
    #[cfg(not(agent_budget_loom))]
    fn with_coarse_clock(
        clock: ClockSource,
        interval: std::time::Duration,
    ) -> std::io::Result<Self>
    where
        Self: Sized;
    /// Sets or replaces an agent's budget.
    fn set_budget(&self, limit: BudgetLimit);
    /// An empty manager on `clock`, its zero at the UTC instant
    /// `utc_origin`.
    fn with_clock_at(clock: ClockSource, utc_origin: chrono::DateTime<chrono::Utc>) -> Self
    where
        Self: Sized;
    /// Sets or replaces an agent's budget with windows on the UTC calendar.
    fn set_calendar(&self, limit: CalendarLimit);
    /// Sets or replaces an agent's budget with one that refills
    /// continuously.
    fn set_refill(&self, limit: RefillLimit);
    /// Puts an agent's budget under another's, or detaches it.
    fn set_parent(&self, child: &AgentId, parent: Option<&AgentId>) -> Result<(), HierarchyError>;
    /// Forgets an agent's budget and usage.
    fn remove_budget(&self, agent_id: &AgentId);
    /// Takes tokens and calls together, or neither.
    fn acquire(
        &self,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<Reservation<'_>, Refused>;
    /// Takes tokens and calls together, or neither, holding an `Arc` of
    /// the manager.
    fn acquire_owned(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<OwnedReservation, Refused>
    where
        Self: Sized;
    /// [`acquire_owned`](Self::acquire_owned), telling `report` where each
    /// level the request was taken at stands right after (the agent's own
    /// level first, as `chain_info` lists them); nothing on a refusal.
    fn acquire_owned_reporting(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
        report: impl FnMut(FullBudgetInfo),
    ) -> Result<OwnedReservation, Refused>
    where
        Self: Sized;
    /// Waits until tokens and calls fit, then takes them.
    #[cfg(feature = "async")]
    fn acquire_wait(
        &self,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl std::future::Future<Output = Result<Reservation<'_>, Refused>> + Send + '_;
    /// Waits until tokens and calls fit, then takes them, holding an `Arc`
    /// of the manager.
    #[cfg(feature = "async")]
    fn acquire_owned_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl std::future::Future<Output = Result<OwnedReservation, Refused>> + Send + 'static
    where
        Self: Sized;
    /// Takes every claim at its agent and ancestors, all or none.
    fn acquire_set(&self, claims: &[Claim]) -> Result<SetReservation<'_>, Refused>;
    /// [`acquire_set`](Self::acquire_set), holding an `Arc` of the manager.
    fn acquire_set_owned(
        self: &Arc<Self>,
        claims: &[Claim],
    ) -> Result<OwnedSetReservation, Refused>
    where
        Self: Sized;
    /// [`acquire_set`](Self::acquire_set), the limits `shadowed` names
    /// taken past their limit instead of refusing (shadow mode).
    fn acquire_set_shadowed(
        &self,
        claims: &[Claim],
        shadowed: impl Fn(&AgentId) -> bool,
    ) -> Result<SetReservation<'_>, Refused>;
    /// [`acquire_set_shadowed`](Self::acquire_set_shadowed), holding an
    /// `Arc` of the manager.
    fn acquire_set_owned_shadowed(
        self: &Arc<Self>,
        claims: &[Claim],
        shadowed: impl Fn(&AgentId) -> bool,
    ) -> Result<OwnedSetReservation, Refused>
    where
        Self: Sized;
    /// Waits until every claim fits, then takes them all.
    #[cfg(feature = "async")]
    fn acquire_set_owned_wait(
        self: &Arc<Self>,
        claims: Vec<Claim>,
    ) -> impl std::future::Future<Output = Result<OwnedSetReservation, Refused>> + Send + 'static
    where
        Self: Sized;
    /// How many futures are waiting for budget.
    #[cfg(feature = "async")]
    fn waiting(&self) -> usize;
    /// Takes tokens (the seed's API).
    fn reserve(&self, agent_id: &AgentId, tokens: u64) -> Result<(), BudgetExceeded>;
    /// Gives tokens back to the current window (the seed's API).
    fn release(&self, agent_id: &AgentId, tokens: u64);
    /// Counts one call (the seed's API).
    fn track_call(&self, agent_id: &AgentId) -> Result<(), BudgetExceeded>;
    /// What is left in the current window.
    fn remaining(&self, agent_id: &AgentId) -> BudgetInfo;
    /// Whether the agent has both tokens and calls left.
    fn can_schedule(&self, agent_id: &AgentId) -> bool;
    /// Whether an `acquire` of these amounts would be admitted now, taking
    /// nothing.
    fn check(&self, agent_id: &AgentId, tokens: u64, calls: u64) -> Result<(), Refused>;
    /// Whether an `acquire_set` of these claims would be admitted now,
    /// taking nothing.
    fn check_set(&self, claims: &[Claim]) -> Result<(), Refused>;
    /// Starts a fresh window now.
    fn reset_window(&self, agent_id: &AgentId);
    /// Limits and usage of one agent.
    fn full_info(&self, agent_id: &AgentId) -> Option<FullBudgetInfo>;
    /// Limits and usage of the agent and each of its ancestors.
    fn chain_info(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo>;
    /// Limits and usage of every agent.
    fn all_full_info(&self) -> Vec<FullBudgetInfo>;
    /// Writes the state to a JSON file, atomically.
    fn persist(&self, path: &Path) -> Result<(), PersistError>;
    /// Replaces the state by a JSON file's.
    fn restore(&self, path: &Path) -> Result<(), PersistError>;
}
