//! Agent handles: the manager's semantics without the lookup, and nothing
//! admitted once the agent is removed.

mod common;

use std::sync::Arc;
use std::thread;

use agent_budget::{BudgetKind, BudgetManager, OwnedAgentHandle};
use common::{agent, limit, MockTime};

fn mocked() -> (BudgetManager, MockTime) {
    let (clock, mock) = quanta::Clock::mock();
    (BudgetManager::with_clock(clock), MockTime(mock))
}

#[test]
fn a_handle_answers_exactly_as_the_manager_does() {
    let (m, time) = mocked();
    let (by_handle, by_id) = (agent(), agent());
    for a in [by_handle, by_id] {
        m.set_budget(limit(a, 100, 5, 10));
    }
    let handle = m.handle(&by_handle).expect("configured");
    assert_eq!(handle.agent_id(), by_handle);
    // The same sequence on two identical agents: one through the handle,
    // one through the manager.
    for step in 0..40u64 {
        let tokens = step * 7 % 45;
        let (h, i) = match step % 5 {
            0 => (
                handle.reserve(tokens).map_err(|e| (e.kind, e.retry_after)),
                m.reserve(&by_id, tokens)
                    .map_err(|e| (e.kind, e.retry_after)),
            ),
            1 => (
                handle.track_call().map_err(|e| (e.kind, e.retry_after)),
                m.track_call(&by_id).map_err(|e| (e.kind, e.retry_after)),
            ),
            2 => (
                handle
                    .acquire(tokens, 1)
                    .map(|r| {
                        r.settle(tokens / 2);
                    })
                    .map_err(|e| (e.kind, e.retry_after)),
                m.acquire(&by_id, tokens, 1)
                    .map(|r| {
                        r.settle(tokens / 2);
                    })
                    .map_err(|e| (e.kind, e.retry_after)),
            ),
            3 => {
                handle.release(tokens);
                m.release(&by_id, tokens);
                (Ok(()), Ok(()))
            }
            _ => {
                time.advance_secs(3);
                (Ok(()), Ok(()))
            }
        };
        assert_eq!(h, i, "step {step}");
        assert_eq!(handle.remaining(), m.remaining(&by_id), "step {step}");
    }
}

#[test]
fn a_removed_agents_handle_is_refused_even_after_the_budget_is_set_again() {
    let (m, _) = mocked();
    let a = agent();
    m.set_budget(limit(a, 100, 5, 60));
    let handle = m.handle(&a).expect("configured");
    handle.reserve(10).unwrap();
    m.remove_budget(&a);
    let refused = handle.reserve(1).unwrap_err();
    assert_eq!(
        (refused.kind, refused.retry_after),
        (BudgetKind::Token, None)
    );
    assert!(
        refused.to_string().starts_with("No budget configured"),
        "{refused}"
    );
    assert!(handle.track_call().is_err());
    assert!(handle.acquire(1, 1).is_err());
    assert!(handle.remaining().is_exhausted);
    m.set_budget(limit(a, 100, 5, 60));
    assert!(
        handle.reserve(1).is_err(),
        "the old handle never reaches the new budget"
    );
    handle.release(50);
    assert_eq!(m.full_info(&a).unwrap().tokens_used, 0);
    let fresh = m.handle(&a).expect("configured again");
    fresh.reserve(1).unwrap();
    assert_eq!(m.full_info(&a).unwrap().tokens_used, 1);
    assert!(
        m.handle(&agent()).is_none(),
        "no handle for an agent without a budget"
    );
}

#[test]
fn a_handle_honours_the_agents_chain_and_its_new_limits() {
    let (m, _) = mocked();
    let (team, key) = (agent(), agent());
    m.set_budget(limit(team, 50, 10, 60));
    m.set_budget(limit(key, 100, 10, 60));
    m.set_parent(&key, Some(&team)).unwrap();
    let handle = m.handle(&key).expect("configured");
    let reservation = handle.acquire(40, 1).unwrap();
    let refused = handle.reserve(20).unwrap_err();
    assert_eq!(refused.refused_by, team);
    assert_eq!(
        m.chain_info(&key)
            .iter()
            .map(|l| l.tokens_used)
            .collect::<Vec<_>>(),
        [40, 40]
    );
    handle.release(15);
    assert_eq!(
        m.chain_info(&key)
            .iter()
            .map(|l| l.tokens_used)
            .collect::<Vec<_>>(),
        [25, 25]
    );
    drop(reservation);
    // A new limit reaches the handle: it is the same cell.
    m.set_budget(limit(key, 30, 10, 60));
    assert!(handle.reserve(6).is_err());
    handle.reserve(5).unwrap();
}

#[test]
fn a_handle_follows_its_agent_to_a_wider_cell_and_its_later_limits() {
    // The agent's cell moves when a limit needs the wider word (here, calls
    // past 2^16); its old cell keeps the policy it had. A handle made
    // before the move once read that policy through its hint and judged a
    // later, smaller limit by it: 500 tokens of a 10-token budget.
    let m = Arc::new(mocked().0);
    let key = agent();
    m.set_budget(limit(key, 1_000, 100, 60));
    let handle = m.handle(&key).expect("configured");
    let owned = m.handle_owned(&key).expect("configured");
    m.set_budget(limit(key, 1_000, 100_000, 60));
    m.set_budget(limit(key, 10, 100_000, 60));
    let refused = handle.reserve(500).unwrap_err();
    assert_eq!(refused.kind, BudgetKind::Token);
    assert!(owned.acquire(11, 1).is_err(), "the owned handle too");
    assert_eq!(m.remaining(&key).tokens_remaining, 10, "nothing taken");
    handle.reserve(10).unwrap();
    assert_eq!(m.remaining(&key).tokens_remaining, 0);
    // And back to the narrow word, smaller still.
    m.set_budget(limit(key, 5, 100, 60));
    assert!(owned.acquire(1, 1).is_err(), "5 were used of a limit of 5");
    assert_eq!(handle.remaining().tokens_remaining, 0);
}

#[test]
fn owned_handles_work_from_many_threads_and_admit_exactly_the_budget() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    send_sync_static::<OwnedAgentHandle>();
    let m = Arc::new(BudgetManager::with_clock(quanta::Clock::new()));
    let a = agent();
    m.set_budget(limit(a, 10_000, 100_000, 3_600));
    let admitted: u64 = thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let handle = m.handle_owned(&a).expect("configured");
                s.spawn(move || {
                    let mut mine = 0;
                    // Bounded: 10,000 tokens run out long before.
                    for _ in 0..20_000 {
                        match handle.acquire(1, 1) {
                            Ok(r) => {
                                drop(r);
                                mine += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(admitted, 10_000);
    let info = m.full_info(&a).unwrap();
    assert_eq!((info.tokens_used, info.calls_used), (10_000, 10_000));
}
