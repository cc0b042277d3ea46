//! Chains of budgets (`set_parent`), on both managers, through the public
//! API only: linking and its refusals, all-or-nothing admission across
//! levels, settling at every level in each level's own window, removal, and
//! levels that refill continuously under levels that use windows.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agent_budget::{
    AgentId, BudgetKind, BudgetLimiter, FullBudgetInfo, HierarchyError, RefillLimit, Settlement,
    MAX_LEVELS,
};
use common::{agent, limit, mocked};

/// Tokens and calls used at the agent's own level.
fn used<M: BudgetLimiter>(m: &M, a: &AgentId) -> (u64, u64) {
    let info = m.full_info(a).expect("the agent has a budget");
    (info.tokens_used, info.calls_used)
}

/// Tokens and calls used at every level of the agent's chain, agent first.
fn chain_used<M: BudgetLimiter>(m: &M, a: &AgentId) -> Vec<(u64, u64)> {
    m.chain_info(a)
        .iter()
        .map(|info| (info.tokens_used, info.calls_used))
        .collect()
}

/// The ids of the agent's chain, agent first.
fn chain_ids<M: BudgetLimiter>(m: &M, a: &AgentId) -> Vec<AgentId> {
    m.chain_info(a).iter().map(|info| info.agent_id).collect()
}

/// `chain_info` of each agent: what a refused `set_parent` must not change.
fn snapshot<M: BudgetLimiter>(m: &M, agents: &[AgentId]) -> Vec<Vec<FullBudgetInfo>> {
    agents.iter().map(|a| m.chain_info(a)).collect()
}

fn link<M: BudgetLimiter>(m: &M, child: AgentId, parent: AgentId) {
    m.set_parent(&child, Some(&parent))
        .unwrap_or_else(|e| panic!("linking {child} under {parent}: {e}"));
}

fn bucket(agent_id: AgentId, tokens: u64, calls: u64, period: Duration) -> RefillLimit {
    RefillLimit {
        agent_id,
        token_budget: tokens,
        calls_budget: calls,
        refill_period: period,
    }
}

fn applied(refunded_tokens: u64, charged_tokens: u64, refunded_calls: u64) -> Settlement {
    Settlement::Applied {
        refunded_tokens,
        charged_tokens,
        refunded_calls,
    }
}

// ---------------------------------------------------------------------------
// Linking

for_both_managers! {
    fn set_parent_refuses_unknown_agents_on_either_side_and_changes_nothing<M>() {
        let (m, _) = mocked::<M>();
        let (parent, child, ghost) = (agent(), agent(), agent());
        m.set_budget(limit(parent, 100, 10, 60));
        m.set_budget(limit(child, 100, 10, 60));
        link(&m, child, parent);
        let before = snapshot(&m, &[parent, child, ghost]);
        assert_eq!(m.set_parent(&ghost, Some(&parent)), Err(HierarchyError::UnknownAgent(ghost)));
        assert_eq!(m.set_parent(&child, Some(&ghost)), Err(HierarchyError::UnknownAgent(ghost)));
        assert_eq!(m.set_parent(&ghost, None), Err(HierarchyError::UnknownAgent(ghost)));
        assert_eq!(m.set_parent(&ghost, Some(&ghost)), Err(HierarchyError::UnknownAgent(ghost)));
        assert_eq!(snapshot(&m, &[parent, child, ghost]), before);
        assert_eq!(chain_ids(&m, &child), [child, parent], "the child keeps its parent");
        let message = HierarchyError::UnknownAgent(ghost).to_string();
        assert!(message.contains(&ghost.to_string()), "{message}");

        // A removed agent is unknown too.
        let other = agent();
        m.set_budget(limit(other, 100, 10, 60));
        m.remove_budget(&other);
        assert_eq!(m.set_parent(&child, Some(&other)), Err(HierarchyError::UnknownAgent(other)));
        assert_eq!(m.set_parent(&other, Some(&parent)), Err(HierarchyError::UnknownAgent(other)));
        assert_eq!(snapshot(&m, &[parent, child, ghost]), before);
    }
}

for_both_managers! {
    fn set_parent_refuses_cycles_including_an_agent_under_itself<M>() {
        let (m, _) = mocked::<M>();
        let (org, team, key) = (agent(), agent(), agent());
        for a in [org, team, key] {
            m.set_budget(limit(a, 100, 10, 60));
        }
        link(&m, team, org);
        link(&m, key, team);
        let _held = m.acquire(&key, 10, 1).unwrap();
        let before = snapshot(&m, &[org, team, key]);
        for (child, parent) in [(org, key), (org, team), (team, key), (key, key), (org, org)] {
            assert_eq!(
                m.set_parent(&child, Some(&parent)),
                Err(HierarchyError::Cycle { child, parent }),
                "{child} under {parent}"
            );
            assert_eq!(snapshot(&m, &[org, team, key]), before, "{child} under {parent}");
        }
        assert_eq!(chain_ids(&m, &key), [key, team, org]);
        let message = HierarchyError::Cycle { child: org, parent: key }.to_string();
        assert!(message.contains(&org.to_string()) && message.contains(&key.to_string()), "{message}");
    }
}

for_both_managers! {
    fn no_chain_may_exceed_max_levels_from_either_end<M>() {
        let (m, _) = mocked::<M>();
        // levels[0] is the root, levels[MAX_LEVELS - 1] the leaf.
        let levels: Vec<AgentId> = (0..MAX_LEVELS).map(|_| agent()).collect();
        for a in &levels {
            m.set_budget(limit(*a, 100, 10, 60));
        }
        for pair in levels.windows(2) {
            link(&m, pair[1], pair[0]);
        }
        let leaf = levels[MAX_LEVELS - 1];
        let mut expected: Vec<AgentId> = levels.clone();
        expected.reverse();
        assert_eq!(chain_ids(&m, &leaf), expected, "{MAX_LEVELS} levels are allowed");

        let (below, above, sub, sub_child) = (agent(), agent(), agent(), agent());
        for a in [below, above, sub, sub_child] {
            m.set_budget(limit(a, 100, 10, 60));
        }
        link(&m, sub_child, sub);
        let everyone: Vec<AgentId> = levels.iter().copied().chain([below, above, sub, sub_child]).collect();
        let before = snapshot(&m, &everyone);
        let too_deep = Err(HierarchyError::TooDeep { levels: MAX_LEVELS + 1 });
        // One more level under the leaf, or over the root.
        assert_eq!(m.set_parent(&below, Some(&leaf)), too_deep);
        assert_eq!(m.set_parent(&levels[0], Some(&above)), too_deep);
        // A two-level subtree hung one level too low.
        assert_eq!(m.set_parent(&sub, Some(&levels[MAX_LEVELS - 2])), too_deep);
        assert_eq!(snapshot(&m, &everyone), before);
        // One level higher, it fits: MAX_LEVELS levels again.
        link(&m, sub, levels[MAX_LEVELS - 3]);
        assert_eq!(m.chain_info(&sub_child).len(), MAX_LEVELS);
        // Re-linking the leaf where it already is stays within the bound.
        link(&m, leaf, levels[MAX_LEVELS - 2]);

        // An admission at the bottom of a full-height chain takes at every level.
        let taken = m.acquire(&leaf, 7, 1).unwrap();
        assert_eq!(chain_used(&m, &leaf), vec![(7, 1); MAX_LEVELS]);
        assert_eq!(taken.cancel(), applied(7, 0, 1));
        assert_eq!(chain_used(&m, &leaf), vec![(0, 0); MAX_LEVELS]);
    }
}

for_both_managers! {
    fn re_parenting_moves_a_subtree_and_old_reservations_keep_their_levels<M>() {
        let (m, _) = mocked::<M>();
        let (old_org, new_org, team, key) = (agent(), agent(), agent(), agent());
        for a in [old_org, new_org, team, key] {
            m.set_budget(limit(a, 1_000, 100, 60));
        }
        link(&m, team, old_org);
        link(&m, key, team);
        let taken_before = m.acquire(&key, 30, 1).unwrap();
        link(&m, team, new_org);
        assert_eq!(chain_ids(&m, &key), [key, team, new_org], "the key moved with its team");
        assert_eq!(chain_used(&m, &key), [(30, 1), (30, 1), (0, 0)]);
        assert_eq!(used(&m, &old_org), (30, 1), "what was taken stays taken");
        let taken_after = m.acquire(&key, 10, 1).unwrap();
        assert_eq!(chain_used(&m, &key), [(40, 2), (40, 2), (10, 1)]);
        assert_eq!(used(&m, &old_org), (30, 1));
        // The old reservation gives back where it was taken: the old org.
        assert_eq!(taken_before.cancel(), applied(30, 0, 1));
        assert_eq!(used(&m, &old_org), (0, 0));
        assert_eq!(chain_used(&m, &key), [(10, 1), (10, 1), (10, 1)]);
        drop(taken_after);
    }
}

for_both_managers! {
    fn none_detaches_and_the_old_parent_keeps_what_was_taken<M>() {
        let (m, _) = mocked::<M>();
        let (parent, child) = (agent(), agent());
        m.set_budget(limit(parent, 50, 5, 60));
        m.set_budget(limit(child, 100, 10, 60));
        link(&m, child, parent);
        let held = m.acquire(&child, 50, 1).unwrap();
        assert_eq!(m.acquire(&child, 1, 0).unwrap_err().refused_by, parent);

        m.set_parent(&child, None).unwrap();
        assert_eq!(chain_ids(&m, &child), [child]);
        let alone = m.acquire(&child, 40, 1).expect("the old parent no longer limits it");
        assert_eq!(used(&m, &parent), (50, 1));
        // Detaching an agent without a parent is fine and changes nothing.
        let before = snapshot(&m, &[parent, child]);
        m.set_parent(&child, None).unwrap();
        assert_eq!(snapshot(&m, &[parent, child]), before);
        // The reservation taken while attached still settles at the parent.
        assert_eq!(held.cancel(), applied(50, 0, 1));
        assert_eq!(used(&m, &parent), (0, 0));
        assert_eq!(used(&m, &child), (40, 1));
        drop(alone);
    }
}

// ---------------------------------------------------------------------------
// Admission: every level or none

for_both_managers! {
    fn acquire_takes_at_both_levels_or_neither_and_names_the_refusing_level<M>() {
        let (m, time) = mocked::<M>();
        let (parent, child, sibling) = (agent(), agent(), agent());
        let (parent_tokens, parent_calls, parent_window) = (100, 4, 60);
        let child_window = 10;
        m.set_budget(limit(parent, parent_tokens, parent_calls, parent_window));
        m.set_budget(limit(child, 1_000, 100, child_window));
        m.set_budget(limit(sibling, 1_000, 100, child_window));
        link(&m, child, parent);
        link(&m, sibling, parent);
        let held = m.acquire(&sibling, 70, 3).unwrap();
        let elapsed = 5;
        time.advance_secs(elapsed);
        let parent_retry = Some(Duration::from_secs(parent_window - elapsed));
        let left = parent_tokens - 70;

        // Tokens short at the parent; the child alone had room.
        let err = m.acquire(&child, left + 10, 1).unwrap_err();
        assert_eq!((err.agent_id, err.refused_by, err.kind), (child, parent, BudgetKind::Token));
        assert_eq!(err.retry_after, parent_retry);
        assert!(err.to_string().contains(&format!("requested {} tokens but only {left} remaining", left + 10)), "{err}");
        assert!(err.to_string().ends_with(&format!(", at its ancestor {parent}")), "{err}");
        // Calls short at the parent.
        let err = m.acquire(&child, 1, parent_calls - 3 + 1).unwrap_err();
        assert_eq!((err.refused_by, err.kind, err.retry_after), (parent, BudgetKind::Call, parent_retry));
        // More than the parent's limit, though within the child's: never.
        let err = m.acquire(&child, parent_tokens + 1, 1).unwrap_err();
        assert_eq!((err.refused_by, err.kind, err.retry_after), (parent, BudgetKind::Token, None));
        let err = m.acquire(&child, 0, parent_calls + 1).unwrap_err();
        assert_eq!((err.refused_by, err.kind, err.retry_after), (parent, BudgetKind::Call, None));
        // Nothing was taken at any level.
        assert_eq!(chain_used(&m, &child), [(0, 0), (70, 3)]);
        assert_eq!(used(&m, &sibling), (70, 3));

        // What fits at both levels is taken at both.
        let taken = m.acquire(&child, left, 1).unwrap();
        assert_eq!(chain_used(&m, &child), [(left, 1), (parent_tokens, parent_calls)]);
        // The lowest level short of room is the one named: the child itself
        // (its own window, its own message) before the exhausted parent.
        let err = m.acquire(&child, 1_000 - left + 1, 0).unwrap_err();
        assert_eq!((err.refused_by, err.kind), (child, BudgetKind::Token));
        assert_eq!(err.retry_after, Some(Duration::from_secs(child_window - elapsed)));
        assert!(!err.to_string().contains("ancestor"), "{err}");
        let err = m.acquire(&child, 1_001, 0).unwrap_err();
        assert_eq!((err.refused_by, err.retry_after), (child, None));
        assert_eq!(chain_used(&m, &child), [(left, 1), (parent_tokens, parent_calls)]);
        drop((held, taken));
    }
}

for_both_managers! {
    fn acquire_owned_takes_at_every_level_or_none<M>() {
        let (m, _) = mocked::<M>();
        let m = Arc::new(m);
        let (parent, child) = (agent(), agent());
        m.set_budget(limit(parent, 50, 5, 60));
        m.set_budget(limit(child, 500, 50, 60));
        link(&*m, child, parent);
        let owned = m.acquire_owned(&child, 50, 1).unwrap();
        let err = m.acquire_owned(&child, 1, 1).unwrap_err();
        assert_eq!((err.refused_by, err.kind), (parent, BudgetKind::Token));
        assert_eq!(chain_used(&*m, &child), [(50, 1), (50, 1)]);
        assert_eq!(owned.settle(20), applied(30, 0, 0));
        assert_eq!(chain_used(&*m, &child), [(20, 1), (20, 1)]);
    }
}

for_both_managers! {
    fn reserve_track_call_and_acquire_across_three_levels<M>() {
        let (m, time) = mocked::<M>();
        let (org, team, key, team2, key2) = (agent(), agent(), agent(), agent(), agent());
        let (key_window, team_window, org_window) = (10, 30, 60);
        let (team_tokens, org_tokens, org_calls) = (500, 780, 3);
        m.set_budget(limit(org, org_tokens, org_calls, org_window));
        m.set_budget(limit(team, team_tokens, 50, team_window));
        m.set_budget(limit(key, 1_000, 100, key_window));
        m.set_budget(limit(team2, 1_000, 100, team_window));
        m.set_budget(limit(key2, 1_000, 100, key_window));
        link(&m, team, org);
        link(&m, key, team);
        link(&m, team2, org);
        link(&m, key2, team2);
        m.reserve(&key, 450).unwrap();
        m.reserve(&key2, 300).unwrap();
        for _ in 0..org_calls {
            m.track_call(&key2).unwrap();
        }
        let elapsed = 5;
        time.advance_secs(elapsed);
        let before = chain_used(&m, &key);
        assert_eq!(before, [(450, 0), (450, 0), (750, org_calls)]);

        // The team lacks room (and so would the org): the team is named.
        let err = m.reserve(&key, team_tokens - 450 + 10).unwrap_err();
        assert_eq!((err.refused_by, err.kind), (team, BudgetKind::Token));
        assert_eq!(err.retry_after, Some(Duration::from_secs(team_window - elapsed)));
        assert_eq!(
            err.message,
            format!("Token budget exceeded: requested {} but only {} remaining, at its ancestor {team}", team_tokens - 450 + 10, team_tokens - 450)
        );
        // The team has room, the org does not.
        let err = m.reserve(&key, org_tokens - 750 + 10).unwrap_err();
        assert_eq!((err.refused_by, err.kind), (org, BudgetKind::Token));
        assert_eq!(err.retry_after, Some(Duration::from_secs(org_window - elapsed)));
        // More than the team's limit: never.
        let err = m.reserve(&key, team_tokens + 1).unwrap_err();
        assert_eq!((err.refused_by, err.retry_after), (team, None));
        // The org's calls are used up.
        let err = m.track_call(&key).unwrap_err();
        assert_eq!((err.refused_by, err.kind), (org, BudgetKind::Call));
        assert_eq!(err.retry_after, Some(Duration::from_secs(org_window - elapsed)));
        assert_eq!(
            err.message,
            format!("Call budget exceeded: {org_calls} calls used, limit is {org_calls}, at its ancestor {org}")
        );
        let err = m.acquire(&key, 1, 1).unwrap_err();
        assert_eq!((err.refused_by, err.kind), (org, BudgetKind::Call));
        assert_eq!(chain_used(&m, &key), before, "a refusal leaves every level as it was");
        assert_eq!(chain_used(&m, &key2), [(300, org_calls), (300, org_calls), (750, org_calls)]);

        // What fits everywhere is taken everywhere.
        m.reserve(&key, org_tokens - 750).unwrap();
        let full = org_tokens - 750 + 450;
        assert_eq!(chain_used(&m, &key), [(full, 0), (full, 0), (org_tokens, org_calls)]);
        assert!(m.acquire(&key, 0, 0).is_ok(), "nothing always fits");
    }
}

// ---------------------------------------------------------------------------
// Settling at every level, each in its own window

for_both_managers! {
    fn settle_and_cancel_apply_where_each_levels_window_is_still_current<M>() {
        let (m, time) = mocked::<M>();
        let (org, team, key) = (agent(), agent(), agent());
        // The key's window is the shortest: it ends first.
        m.set_budget(limit(org, 1_000, 100, 60));
        m.set_budget(limit(team, 1_000, 100, 30));
        m.set_budget(limit(key, 1_000, 100, 10));
        link(&m, team, org);
        link(&m, key, team);
        let first = m.acquire(&key, 100, 1).unwrap();
        time.advance_secs(15); // the key's window [0, 10) has ended
        // Taken in the key's window [15, 25), and the others' [0, ...).
        let second = m.acquire(&key, 40, 1).unwrap();
        let third = m.acquire(&key, 20, 1).unwrap();
        assert_eq!(chain_used(&m, &key), [(60, 2), (160, 3), (160, 3)]);
        // The refund reaches the team and the org, whose windows are current,
        // and not the key's new window.
        assert_eq!(first.cancel(), Settlement::WindowEnded);
        assert_eq!(chain_used(&m, &key), [(60, 2), (60, 2), (60, 2)]);
        // Every level's window is current: each gets the refund, although
        // the levels' windows began at different times.
        time.advance_secs(5);
        assert_eq!(third.cancel(), applied(20, 0, 1));
        assert_eq!(chain_used(&m, &key), [(40, 1), (40, 1), (40, 1)]);

        time.advance_secs(6); // t = 26: the key's [15, 25) ended, the team's [0, 30) not
        assert_eq!(second.settle(70), Settlement::CarriedOver { charged_tokens: 30 });
        // The key's current window gets the 30 tokens used beyond the
        // reservation; the team and the org, still in the reservation's
        // window, are charged there.
        assert_eq!(chain_used(&m, &key), [(30, 0), (70, 1), (70, 1)]);

        // A dropped reservation stays charged at every level.
        let dropped = m.acquire(&key, 5, 1).unwrap();
        let before = chain_used(&m, &key);
        drop(dropped);
        assert_eq!(chain_used(&m, &key), before);
        assert_eq!(before, [(35, 1), (75, 2), (75, 2)]);
    }
}

for_both_managers! {
    fn an_ancestors_ended_window_gets_no_refund_but_the_carried_over_charge<M>() {
        let (m, time) = mocked::<M>();
        let (org, team, key) = (agent(), agent(), agent());
        // Now the org's window is the shortest.
        m.set_budget(limit(org, 1_000, 100, 10));
        m.set_budget(limit(team, 1_000, 100, 30));
        m.set_budget(limit(key, 1_000, 100, 60));
        link(&m, team, org);
        link(&m, key, team);
        let overused = m.acquire(&key, 100, 1).unwrap();
        let cancelled = m.acquire(&key, 50, 1).unwrap();
        time.advance_secs(15); // the org's [0, 10) ended; the team's and key's current
        assert_eq!(overused.settle(130), applied(0, 30, 0));
        assert_eq!(chain_used(&m, &key), [(180, 2), (180, 2), (30, 0)]);

        time.advance_secs(20); // t = 35: the team's [0, 30) ended too
        let fresh = m.acquire(&key, 5, 1).unwrap();
        assert_eq!(chain_used(&m, &key), [(185, 3), (5, 1), (5, 1)]);
        // Only the key, whose window is still the reservation's, gets it back.
        assert_eq!(cancelled.cancel(), applied(50, 0, 1));
        assert_eq!(chain_used(&m, &key), [(135, 2), (5, 1), (5, 1)]);
        drop(fresh);
    }
}

for_both_managers! {
    fn release_gives_back_at_every_level_never_below_zero<M>() {
        let (m, _) = mocked::<M>();
        let (org, team, key, sibling) = (agent(), agent(), agent(), agent());
        for a in [org, team, key, sibling] {
            m.set_budget(limit(a, 1_000, 100, 60));
        }
        link(&m, team, org);
        link(&m, key, team);
        link(&m, sibling, team);
        m.reserve(&key, 50).unwrap();
        m.reserve(&sibling, 40).unwrap();
        m.release(&key, 20);
        assert_eq!(chain_used(&m, &key), [(30, 0), (70, 0), (70, 0)]);
        // It trusts the amount: never below zero at the key, and the team and
        // org give back the whole amount, whoever spent it there.
        m.release(&key, 60);
        assert_eq!(chain_used(&m, &key), [(0, 0), (10, 0), (10, 0)]);
        assert_eq!(used(&m, &sibling), (40, 0));
        m.release(&key, 1_000);
        assert_eq!(chain_used(&m, &key), [(0, 0), (0, 0), (0, 0)]);
    }
}

// ---------------------------------------------------------------------------
// Reading

for_both_managers! {
    fn remaining_and_full_info_read_one_level_can_schedule_and_chain_info_all<M>() {
        let (m, _) = mocked::<M>();
        let (parent, child, sibling, ghost) = (agent(), agent(), agent(), agent());
        m.set_budget(limit(parent, 100, 10, 60));
        m.set_budget(limit(child, 1_000, 100, 60));
        m.set_budget(limit(sibling, 1_000, 100, 60));
        link(&m, child, parent);
        link(&m, sibling, parent);
        let held = m.acquire(&sibling, 100, 1).unwrap();

        let own = m.remaining(&child);
        assert_eq!((own.tokens_remaining, own.calls_remaining, own.is_exhausted), (1_000, 100, false));
        let info = m.full_info(&child).unwrap();
        assert_eq!((info.token_limit, info.tokens_used, info.tokens_remaining), (1_000, 0, 1_000));
        assert!(!m.can_schedule(&child), "its parent is exhausted");
        assert!(!m.can_schedule(&parent));
        assert_eq!(
            m.chain_info(&child),
            vec![m.full_info(&child).unwrap(), m.full_info(&parent).unwrap()]
        );
        assert_eq!(m.chain_info(&parent), vec![m.full_info(&parent).unwrap()]);
        assert!(m.chain_info(&ghost).is_empty());
        assert!(!m.can_schedule(&ghost));

        assert_eq!(held.cancel(), applied(100, 0, 1));
        assert!(m.can_schedule(&child));
        // The child's own exhaustion closes it, whatever the parent has.
        m.reserve(&child, 1_000).unwrap_err(); // the parent refuses 1,000
        m.set_parent(&child, None).unwrap();
        m.reserve(&child, 1_000).unwrap();
        link(&m, child, parent);
        assert!(!m.can_schedule(&child));
        assert!(m.can_schedule(&sibling));
    }
}

// ---------------------------------------------------------------------------
// Removal

for_both_managers! {
    fn removing_a_parent_detaches_its_children_who_keep_their_usage<M>() {
        let (m, _) = mocked::<M>();
        let (parent, first, second) = (agent(), agent(), agent());
        m.set_budget(limit(parent, 100, 10, 60));
        m.set_budget(limit(first, 1_000, 100, 60));
        m.set_budget(limit(second, 1_000, 100, 60));
        link(&m, first, parent);
        link(&m, second, parent);
        let taken = m.acquire(&first, 60, 1).unwrap();
        m.acquire(&second, 30, 1).map(drop).unwrap();

        m.remove_budget(&parent);
        assert!(m.full_info(&parent).is_none());
        assert_eq!(chain_ids(&m, &first), [first]);
        assert_eq!(chain_ids(&m, &second), [second]);
        assert_eq!((used(&m, &first), used(&m, &second)), ((60, 1), (30, 1)));
        m.acquire(&first, 500, 1).map(drop).expect("no longer held to the parent's 100");
        // The reservation taken under the parent settles at the child alone.
        assert_eq!(taken.cancel(), applied(60, 0, 1));
        assert_eq!(used(&m, &first), (500, 1));

        // A parent set again is a new budget: its children stay detached.
        m.set_budget(limit(parent, 100, 10, 60));
        assert_eq!(chain_ids(&m, &first), [first]);
        // What was taken under one incarnation of a parent never touches the
        // next, even with the child linked to it again.
        link(&m, first, parent);
        let under_old = m.acquire(&first, 50, 1).unwrap();
        m.remove_budget(&parent);
        m.set_budget(limit(parent, 100, 10, 60));
        link(&m, first, parent);
        m.acquire(&first, 20, 1).map(drop).unwrap();
        assert_eq!(chain_used(&m, &first), [(570, 3), (20, 1)]);
        assert_eq!(under_old.cancel(), applied(50, 0, 1));
        assert_eq!(chain_used(&m, &first), [(520, 2), (20, 1)], "the new parent is untouched");
    }
}

for_both_managers! {
    fn removing_a_child_settles_its_reservations_at_its_ancestors_still<M>() {
        let (m, _) = mocked::<M>();
        let (org, team, key) = (agent(), agent(), agent());
        for a in [org, team, key] {
            m.set_budget(limit(a, 1_000, 100, 60));
        }
        link(&m, team, org);
        link(&m, key, team);
        let cancelled = m.acquire(&key, 60, 2).unwrap();
        let overused = m.acquire(&key, 20, 1).unwrap();
        m.remove_budget(&key);
        assert!(m.chain_info(&key).is_empty());
        assert_eq!(chain_used(&m, &team), [(80, 3), (80, 3)]);
        assert_eq!(cancelled.cancel(), Settlement::AgentRemoved);
        assert_eq!(chain_used(&m, &team), [(20, 1), (20, 1)]);
        // Set again, the key is a new budget, without a parent; its old
        // reservation does not touch it but still charges the ancestors.
        m.set_budget(limit(key, 1_000, 100, 60));
        assert_eq!(chain_ids(&m, &key), [key]);
        assert_eq!(overused.settle(35), Settlement::AgentRemoved);
        assert_eq!(used(&m, &key), (0, 0));
        assert_eq!(chain_used(&m, &team), [(35, 1), (35, 1)]);
    }
}

// ---------------------------------------------------------------------------
// Examples

for_both_managers! {
    fn keys_under_teams_under_an_org<M>() {
        let (m, time) = mocked::<M>();
        let window = 60;
        let org = agent();
        let (team_a, team_b) = (agent(), agent());
        let (a1, a2, b1) = (agent(), agent(), agent());
        let (org_tokens, team_tokens) = (10_000, 6_000);
        m.set_budget(limit(org, org_tokens, 1_000, window));
        m.set_budget(limit(team_a, team_tokens, 1_000, window));
        m.set_budget(limit(team_b, team_tokens, 1_000, window));
        m.set_budget(limit(a1, 4_000, 1_000, window));
        m.set_budget(limit(a2, 4_000, 1_000, window));
        m.set_budget(limit(b1, 5_000, 1_000, window));
        link(&m, team_a, org);
        link(&m, team_b, org);
        link(&m, a1, team_a);
        link(&m, a2, team_a);
        link(&m, b1, team_b);

        // a1 estimates 4,000 and uses 3,000.
        m.acquire(&a1, 4_000, 1).unwrap().settle(3_000);
        // a2 fits its key but not what is left of its team.
        let err = m.acquire(&a2, team_tokens - 3_000 + 500, 1).unwrap_err();
        assert_eq!((err.refused_by, err.retry_after), (team_a, Some(Duration::from_secs(window))));
        m.acquire(&a2, team_tokens - 3_000, 1).map(drop).unwrap();
        // b1 fits its key and its team but not what is left of the org.
        let err = m.acquire(&b1, 5_000, 1).unwrap_err();
        assert_eq!(err.refused_by, org);
        assert_eq!(chain_used(&m, &b1), [(0, 0), (0, 0), (team_tokens, 2)]);
        m.acquire(&b1, org_tokens - team_tokens, 1).map(drop).unwrap();
        assert_eq!(chain_used(&m, &b1), [(4_000, 1), (4_000, 1), (org_tokens, 3)]);
        assert_eq!(chain_used(&m, &a1), [(3_000, 1), (team_tokens, 2), (org_tokens, 3)]);
        // Every key has tokens of its own left; no chain can schedule.
        for key in [a1, a2, b1] {
            assert!(!m.remaining(&key).is_exhausted);
            assert!(!m.can_schedule(&key));
        }
        time.advance_secs(window);
        for key in [a1, a2, b1] {
            assert!(m.can_schedule(&key));
        }
        m.acquire(&b1, 5_000, 1).map(drop).unwrap();
    }
}

for_both_managers! {
    fn a_refilling_child_under_a_windowed_parent<M>() {
        let (m, time) = mocked::<M>();
        let (parent, child) = (agent(), agent());
        let (parent_tokens, parent_window) = (150, 60);
        let (bucket_tokens, period) = (100, Duration::from_secs(10));
        m.set_budget(limit(parent, parent_tokens, 10, parent_window));
        m.set_budget(limit(child, 1_000, 100, 3_600));
        link(&m, child, parent);
        // Switching the child to a bucket keeps its parent.
        m.set_refill(bucket(child, bucket_tokens, 100, period));
        assert_eq!(chain_ids(&m, &child), [child, parent]);
        let first = m.acquire(&child, bucket_tokens, 1).unwrap();
        time.advance(period / 2);
        assert_eq!(m.remaining(&child).tokens_remaining, bucket_tokens / 2);
        m.acquire(&child, parent_tokens - bucket_tokens, 1).map(drop).unwrap();
        assert_eq!(m.remaining(&child).tokens_remaining, 0);
        time.advance(period / 2);
        assert_eq!(m.remaining(&child).tokens_remaining, bucket_tokens / 2);
        // The bucket has refilled; the parent's window has not ended.
        let err = m.acquire(&child, 30, 1).unwrap_err();
        assert_eq!((err.refused_by, err.kind), (parent, BudgetKind::Token));
        assert_eq!(err.retry_after, Some(Duration::from_secs(parent_window) - period));
        assert_eq!(m.remaining(&child).tokens_remaining, bucket_tokens / 2, "the refusal took nothing");
        // Cancelled, the first reservation refunds its bucket only what has
        // not refilled already (never above full), and the parent all of it.
        assert_eq!(first.cancel(), applied(bucket_tokens / 2, 0, 0));
        assert_eq!(m.remaining(&child).tokens_remaining, bucket_tokens);
        assert_eq!(used(&m, &parent), (parent_tokens - bucket_tokens, 1));
    }
}

for_both_managers! {
    fn a_windowed_child_under_a_refilling_parent<M>() {
        let (m, time) = mocked::<M>();
        let (parent, child) = (agent(), agent());
        let (bucket_tokens, period_ms) = (100, 10_000);
        m.set_refill(bucket(parent, bucket_tokens, 10, Duration::from_millis(period_ms)));
        m.set_budget(limit(child, 1_000, 100, 60));
        link(&m, child, parent);
        m.acquire(&child, bucket_tokens, 1).map(drop).unwrap();
        let wanted = 30;
        let refill_ms = wanted * period_ms / bucket_tokens;
        let err = m.acquire(&child, wanted, 1).unwrap_err();
        assert_eq!((err.refused_by, err.kind), (parent, BudgetKind::Token));
        assert_eq!(err.retry_after, Some(Duration::from_millis(refill_ms)));
        time.advance(Duration::from_millis(refill_ms - 1));
        let err = m.acquire(&child, wanted, 1).unwrap_err();
        assert_eq!(err.retry_after, Some(Duration::from_millis(1)));
        assert_eq!(used(&m, &child), (bucket_tokens, 1));
        time.advance(Duration::from_millis(1));
        m.acquire(&child, wanted, 1).map(drop).unwrap();
        assert_eq!(used(&m, &child), (bucket_tokens + wanted, 2));
        assert_eq!(m.remaining(&parent).tokens_remaining, 0);
        let err = m.acquire(&child, bucket_tokens + 1, 0).unwrap_err();
        assert_eq!((err.refused_by, err.retry_after), (parent, None));
    }
}

// ---------------------------------------------------------------------------
// Without concurrency, every refusal is justified

mod sequential {
    use super::*;
    use agent_budget::{BudgetExceeded, Reservation};
    use proptest::prelude::*;

    /// key, key2 under team; team, team2 under org.
    const KEY: usize = 0;
    const KEY2: usize = 1;
    const TEAM: usize = 2;
    const TEAM2: usize = 3;
    const ORG: usize = 4;
    const AGENTS: usize = 5;

    #[derive(Clone, Copy, Debug)]
    enum Policy {
        Window {
            tokens: u64,
            calls: u64,
            secs: u64,
        },
        Bucket {
            tokens: u64,
            calls: u64,
            period_ms: u64,
        },
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire(usize, u64, u64),
        Reserve(usize, u64),
        TrackCall(usize),
        Settle(usize, u64),
        Cancel(usize),
        Drop(usize),
        Release(usize, u64),
        Advance(u64),
    }

    fn policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            (0..80u64, 0..8u64, 1..4u64).prop_map(|(tokens, calls, secs)| Policy::Window {
                tokens,
                calls,
                secs
            }),
            (0..80u64, 0..8u64, 1..5_000u64).prop_map(|(tokens, calls, period_ms)| {
                Policy::Bucket {
                    tokens,
                    calls,
                    period_ms,
                }
            }),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let agent = 0..AGENTS;
        prop_oneof![
            6 => (agent.clone(), 0..50u64, 0..4u64).prop_map(|(a, t, c)| Op::Acquire(a, t, c)),
            2 => (agent.clone(), 0..50u64).prop_map(|(a, t)| Op::Reserve(a, t)),
            2 => agent.clone().prop_map(Op::TrackCall),
            3 => (any::<usize>(), 0..60u64).prop_map(|(i, t)| Op::Settle(i, t)),
            2 => any::<usize>().prop_map(Op::Cancel),
            1 => any::<usize>().prop_map(Op::Drop),
            1 => (agent, 0..40u64).prop_map(|(a, t)| Op::Release(a, t)),
            3 => prop_oneof![0..400u64, 900..3_100u64].prop_map(Op::Advance),
        ]
    }

    /// How often the interesting outcomes came up.
    #[derive(Default)]
    struct Seen {
        admitted: u32,
        refused_above: u32,
        /// A key's request refused by the org, two levels up.
        refused_two_up: u32,
    }

    fn used_of(chain: &[FullBudgetInfo]) -> Vec<(u64, u64)> {
        chain
            .iter()
            .map(|i| (i.tokens_used, i.calls_used))
            .collect()
    }

    fn has_room(level: &FullBudgetInfo, (tokens, calls): (u64, u64)) -> bool {
        tokens <= level.tokens_remaining && calls <= level.calls_remaining
    }

    /// Checks an admission's outcome against the chain read just before it
    /// and the chain read just after it.
    fn check(
        policies: &[(AgentId, Policy)],
        before: &[FullBudgetInfo],
        after: &[FullBudgetInfo],
        request: (u64, u64),
        outcome: Result<(), &BudgetExceeded>,
    ) -> Result<(), TestCaseError> {
        match outcome {
            Ok(()) => {
                for level in before {
                    prop_assert!(
                        has_room(level, request),
                        "admitted {request:?} without room at {level:?}"
                    );
                }
                let expected: Vec<_> = used_of(before)
                    .iter()
                    .map(|&(t, c)| (t + request.0, c + request.1))
                    .collect();
                prop_assert_eq!(used_of(after), expected, "taken at every level");
            }
            Err(e) => {
                let at = before.iter().position(|l| l.agent_id == e.refused_by);
                let at = at.ok_or_else(|| {
                    TestCaseError::fail(format!("{e:?} names no level of {before:?}"))
                })?;
                for level in &before[..at] {
                    prop_assert!(
                        has_room(level, request),
                        "{e:?}: a lower level lacked room first: {level:?}"
                    );
                }
                let level = &before[at];
                let (requested, remaining, limit) = match e.kind {
                    BudgetKind::Token => (request.0, level.tokens_remaining, level.token_limit),
                    BudgetKind::Call => (request.1, level.calls_remaining, level.calls_limit),
                };
                prop_assert!(
                    requested > remaining,
                    "unjustified refusal {e:?} by {level:?}"
                );
                prop_assert_eq!(
                    e.retry_after.is_none(),
                    requested > limit,
                    "{:?} by {:?}",
                    e,
                    level
                );
                if let Some(retry) = e.retry_after {
                    prop_assert!(retry >= Duration::from_millis(1), "{e:?}");
                    let policy = policies
                        .iter()
                        .find(|(id, _)| *id == e.refused_by)
                        .unwrap()
                        .1;
                    // A window's retry is its end; a bucket's, no later than full.
                    match policy {
                        Policy::Window { .. } => {
                            prop_assert_eq!(retry.as_secs(), level.window_remaining_secs)
                        }
                        Policy::Bucket { .. } => {
                            prop_assert!(retry.as_secs() <= level.window_remaining_secs)
                        }
                    }
                }
                prop_assert_eq!(before, after, "a refusal changes nothing at any level");
            }
        }
        Ok(())
    }

    fn run<M: BudgetLimiter>(policies: &[Policy], ops: &[Op]) -> Result<Seen, TestCaseError> {
        let (m, time) = mocked::<M>();
        let ids: Vec<AgentId> = (0..AGENTS).map(|_| agent()).collect();
        let configured: Vec<(AgentId, Policy)> =
            ids.iter().copied().zip(policies.iter().copied()).collect();
        for &(id, policy) in &configured {
            match policy {
                Policy::Window {
                    tokens,
                    calls,
                    secs,
                } => m.set_budget(limit(id, tokens, calls, secs)),
                Policy::Bucket {
                    tokens,
                    calls,
                    period_ms,
                } => m.set_refill(bucket(id, tokens, calls, Duration::from_millis(period_ms))),
            }
        }
        for (child, parent) in [(KEY, TEAM), (KEY2, TEAM), (TEAM, ORG), (TEAM2, ORG)] {
            link(&m, ids[child], ids[parent]);
        }
        let mut open: Vec<(AgentId, Reservation<'_>)> = Vec::new();
        let mut seen = Seen::default();
        for op in ops {
            let admission = match *op {
                Op::Acquire(a, t, c) => Some((a, (t, c))),
                Op::Reserve(a, t) => Some((a, (t, 0))),
                Op::TrackCall(a) => Some((a, (0, 1))),
                _ => None,
            };
            if let Some((a, request)) = admission {
                let id = ids[a];
                let before = m.chain_info(&id);
                let outcome = match *op {
                    Op::Acquire(..) => m
                        .acquire(&id, request.0, request.1)
                        .map(|r| open.push((id, r)))
                        .map_err(BudgetExceeded::from),
                    Op::Reserve(..) => m.reserve(&id, request.0),
                    _ => m.track_call(&id),
                };
                let after = m.chain_info(&id);
                match &outcome {
                    Err(e) => {
                        prop_assert_eq!(e.agent_id, id);
                        match op {
                            Op::Reserve(..) => prop_assert_eq!(e.kind, BudgetKind::Token),
                            Op::TrackCall(..) => prop_assert_eq!(e.kind, BudgetKind::Call),
                            _ => {}
                        }
                        seen.refused_above += u32::from(e.refused_by != id);
                        seen.refused_two_up += u32::from(a == KEY && e.refused_by == ids[ORG]);
                    }
                    Ok(()) => seen.admitted += 1,
                }
                check(
                    &configured,
                    &before,
                    &after,
                    request,
                    outcome.as_ref().map(|_| ()),
                )?;
                continue;
            }
            match *op {
                Op::Settle(i, tokens) if !open.is_empty() => {
                    let (id, r) = open.swap_remove(i % open.len());
                    let reserved = r.tokens();
                    let before = used_of(&m.chain_info(&id));
                    r.settle(tokens);
                    let after = used_of(&m.chain_info(&id));
                    let extra = tokens.saturating_sub(reserved);
                    for (b, a) in before.iter().zip(&after) {
                        prop_assert!(
                            a.0 <= b.0 + extra && a.1 <= b.1,
                            "settle({tokens}) of {reserved}: {before:?} -> {after:?}"
                        );
                    }
                }
                Op::Cancel(i) if !open.is_empty() => {
                    let (id, r) = open.swap_remove(i % open.len());
                    let before = used_of(&m.chain_info(&id));
                    r.cancel();
                    let after = used_of(&m.chain_info(&id));
                    for (b, a) in before.iter().zip(&after) {
                        prop_assert!(a.0 <= b.0 && a.1 <= b.1, "cancel: {before:?} -> {after:?}");
                    }
                }
                Op::Drop(i) if !open.is_empty() => {
                    let (id, r) = open.swap_remove(i % open.len());
                    let before = m.chain_info(&id);
                    drop(r);
                    prop_assert_eq!(m.chain_info(&id), before);
                }
                Op::Release(a, tokens) => {
                    let before = used_of(&m.chain_info(&ids[a]));
                    m.release(&ids[a], tokens);
                    let after = used_of(&m.chain_info(&ids[a]));
                    for (b, a) in before.iter().zip(&after) {
                        prop_assert!(
                            a.0 <= b.0 && b.0 - a.0 <= tokens && a.1 == b.1,
                            "release({tokens}): {before:?} -> {after:?}"
                        );
                    }
                }
                Op::Advance(ms) => time.advance(Duration::from_millis(ms)),
                _ => {}
            }
        }
        Ok(seen)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 192,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn every_refusal_is_justified_by_the_chain_read_just_before(
            policies in prop::collection::vec(policy(), AGENTS),
            ops in prop::collection::vec(op(), 1..80),
        ) {
            run::<agent_budget::BudgetManager>(&policies, &ops)?;
            run::<agent_budget::LockedBudgetManager>(&policies, &ops)?;
        }
    }

    /// The generator does reach refusals by ancestors and admissions: the
    /// property above is not checked on empty runs only.
    #[test]
    fn the_generated_runs_admit_and_are_refused_by_ancestors() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let mut total = Seen::default();
        for _ in 0..64 {
            let policies = prop::collection::vec(policy(), AGENTS)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            let ops = prop::collection::vec(op(), 1..80)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            let seen = run::<agent_budget::BudgetManager>(&policies, &ops).unwrap();
            total.admitted += seen.admitted;
            total.refused_above += seen.refused_above;
            total.refused_two_up += seen.refused_two_up;
        }
        let Seen {
            admitted,
            refused_above,
            refused_two_up,
        } = total;
        assert!(admitted > 100, "{admitted} admissions");
        assert!(refused_above > 100, "{refused_above} refusals by ancestors");
        assert!(
            refused_two_up > 10,
            "{refused_two_up} refusals by the org of a key's request"
        );
    }
}

for_both_managers! {
    // `acquire_owned_reporting` reports each level as `chain_info` reads it
    // right after the take, agent first, and reports nothing on a refusal.
    fn an_admission_reports_where_each_level_stands_after_it<M>() {
        let (manager, _time) = mocked::<M>();
        let manager = Arc::new(manager);
        let (key, team, org) = (agent(), agent(), agent());
        manager.set_budget(limit(key, 1_000, 10, 60));
        manager.set_budget(limit(team, 500, 100, 3_600));
        manager.set_budget(limit(org, 10_000, 3, 86_400));
        link(&*manager, key, team);
        link(&*manager, team, org);

        let mut reported = Vec::new();
        let taken = manager
            .acquire_owned_reporting(&key, 300, 1, |info| reported.push(info))
            .expect("every level has room");
        assert_eq!(reported, manager.chain_info(&key));
        let ids: Vec<_> = reported.iter().map(|info| info.agent_id).collect();
        assert_eq!(ids, [key, team, org]);
        let left: Vec<_> = reported
            .iter()
            .map(|i| (i.tokens_remaining, i.calls_remaining))
            .collect();
        assert_eq!(left, [(700, 9), (200, 99), (9_700, 2)]);

        // The team has 200 tokens left: refused there, nothing reported.
        let mut after_refusal = Vec::new();
        let refused = manager
            .acquire_owned_reporting(&key, 300, 1, |info| after_refusal.push(info))
            .expect_err("the team is short");
        assert_eq!(refused.refused_by, team);
        assert!(after_refusal.is_empty(), "{after_refusal:?}");
        assert_eq!(chain_used(&*manager, &key), [(300, 1), (300, 1), (300, 1)]);
        taken.settle(100);
        assert_eq!(chain_used(&*manager, &key), [(100, 1), (100, 1), (100, 1)]);
    }
}
