//! The registry under loom: inserts that grow the index, removals whose
//! slots are reused, and moves between widths, each racing lookups and
//! admissions; the narrow word's modular start at its edges.
#![cfg(agent_budget_loom)]

use std::time::Duration;

use agent_budget::{AgentId, BudgetManager, ClockSource};
use loom::sync::Arc;
use loom::thread;
use loom_tests::{explore, explore_capped, window};

fn agent(n: u128) -> AgentId {
    AgentId::from_u128(0xa9e7_0000 + n)
}

fn used(m: &BudgetManager, agent_id: &AgentId) -> u64 {
    m.full_info(agent_id).map_or(0, |info| info.tokens_used)
}

/// The index holds three entries before it must grow (four under loom,
/// three quarters full): the fourth insert builds a new index and
/// publishes it while two threads admit into agents already there.
#[test]
fn lookups_racing_an_insert_that_grows_the_index_find_every_agent() {
    // Capped: 3,608 interleavings at 3 preemptions, about ten times more
    // per further preemption (the header, the index and two cells are all
    // in the model).
    explore_capped("set_budget (grows the index) vs reserve x2", 4, || {
        let m = Arc::new(BudgetManager::with_clock(ClockSource::mock()));
        for n in 0..3 {
            m.set_budget(window(agent(n), 10));
        }
        let grow = {
            let m = m.clone();
            thread::spawn(move || m.set_budget(window(agent(3), 10)))
        };
        let admits: Vec<_> = (0..2)
            .map(|n| {
                let m = m.clone();
                thread::spawn(move || m.reserve(&agent(n), 1).is_ok())
            })
            .collect();
        grow.join().unwrap();
        for admitted in admits {
            assert!(admitted.join().unwrap(), "an agent was not found");
        }
        assert_eq!((used(&m, &agent(0)), used(&m, &agent(1))), (1, 1));
        for n in 0..4 {
            assert!(m.full_info(&agent(n)).is_some(), "agent {n} lost");
        }
    });
}

/// A removed agent's slot goes to the next new agent once no operation
/// that started before the removal is running. One admitting into the
/// removed agent races its removal and the next agent's arrival: the new
/// agent never gets the old one's usage, whatever interleaving.
#[test]
fn a_reused_slot_never_takes_an_admission_meant_for_its_old_agent() {
    explore("reserve vs remove_budget + set_budget (slot reuse)", || {
        let m = Arc::new(BudgetManager::with_clock(ClockSource::mock()));
        let (old, new) = (agent(1), agent(2));
        m.set_budget(window(old, 10));
        m.reserve(&old, 3).unwrap();
        let admit = {
            let m = m.clone();
            thread::spawn(move || m.reserve(&old, 1).is_ok())
        };
        let replace = {
            let m = m.clone();
            thread::spawn(move || {
                m.remove_budget(&old);
                m.set_budget(window(new, 10));
            })
        };
        let _ = admit.join().unwrap();
        replace.join().unwrap();
        assert_eq!(used(&m, &new), 0, "the new agent got the old one's usage");
        assert!(m.full_info(&old).is_none());
    });
}

/// `set_budget` with a budget too large for a narrow cell moves the agent
/// to a wide one while two threads admit: every admission lands, in one
/// cell or the other, exactly once.
#[test]
fn a_move_to_the_other_width_racing_admissions_loses_nothing() {
    // Capped: 28,190 interleavings at 3 preemptions; at 5 it would take
    // about half an hour.
    explore_capped("set_budget (narrow -> wide) vs reserve x2", 3, || {
        let m = Arc::new(BudgetManager::with_clock(ClockSource::mock()));
        let a = agent(1);
        m.set_budget(window(a, 10));
        let widen = {
            let m = m.clone();
            thread::spawn(move || m.set_budget(window(a, 1 << 40)))
        };
        let admits: Vec<_> = (0..2)
            .map(|_| {
                let m = m.clone();
                thread::spawn(move || m.reserve(&a, 1).is_ok())
            })
            .collect();
        widen.join().unwrap();
        for admitted in admits {
            assert!(admitted.join().unwrap());
        }
        let info = m.full_info(&a).unwrap();
        assert_eq!((info.tokens_used, info.token_limit), (2, 1 << 40));
    });
}

/// A settle that charges more than a narrow word counts widens the cell on
/// its own (under the writer's lock), racing an admission and a handle that
/// must follow the agent to its new cell.
#[test]
fn an_overuse_that_widens_the_cell_racing_a_handle_loses_nothing() {
    explore("settle past the narrow fields vs handle reserve", || {
        let m = std::sync::Arc::new(BudgetManager::with_clock(ClockSource::mock()));
        let a = agent(1);
        m.set_budget(window(a, 100));
        let handle = m.handle_owned(&a).unwrap();
        let taken = m.acquire_owned(&a, 10, 1).unwrap();
        let settle = thread::spawn(move || taken.settle(1 << 30));
        let user = thread::spawn(move || {
            let admitted = handle.reserve(1).is_ok();
            (handle, admitted)
        });
        settle.join().unwrap();
        let (handle, admitted) = user.join().unwrap();
        // The handle's admission happened before the overuse or not at all
        // (the overuse exhausts the window); either way it is counted once.
        let expected = (1 << 30) + u64::from(admitted);
        assert_eq!(used(&m, &a), expected);
        // The handle still reaches the agent, now in a wide cell.
        assert_eq!(handle.remaining().tokens_remaining, 0);
        assert_eq!(handle.remaining(), m.remaining(&a));
    });
}

/// A narrow window's start is kept modulo 2^32 ms. A clock that jumps a
/// full window past the start, 2^32 ms on (49.7 days), races two
/// admissions into a window that was full: the modular start names the
/// old window again, which may only make the agent stricter, never admit
/// past the limit.
#[test]
fn a_narrow_start_that_aliases_only_ever_refuses() {
    for (name, jump) in [
        ("narrow rollover: +61 s vs reserve x2", 61_000),
        ("narrow aliasing: +2^32 ms vs reserve x2", 1 << 32),
    ] {
        // Capped: 7,198 and 4,990 interleavings at 3 preemptions.
        explore_capped(name, 4, move || {
            let clock = ClockSource::mock();
            let m = Arc::new(BudgetManager::with_clock(clock.clone()));
            let a = agent(1);
            m.set_budget(window(a, 1));
            m.reserve(&a, 1).unwrap();
            let advance = thread::spawn(move || clock.advance(Duration::from_millis(jump)));
            let admits: Vec<_> = (0..2)
                .map(|_| {
                    let m = m.clone();
                    thread::spawn(move || u64::from(m.reserve(&a, 1).is_ok()))
                })
                .collect();
            advance.join().unwrap();
            let admitted: u64 = admits.into_iter().map(|h| h.join().unwrap()).sum();
            assert!(admitted <= 1, "admitted {admitted} into a window of 1");
            assert_eq!(used(&m, &a), admitted.max(u64::from(jump == 1 << 32)));
        });
    }
}
